"""How the fused quantizer ops run: the one kernel switch, the compiled-kernel runner and the reference-or-fused wrapper.

Backends (:func:`set_kernels` / :func:`kernels`, env ``QUANTBENCH_KERNELS``):

* ``native`` (default): contiguous float32 CPU tensors go through the C kernels of :mod:`.native` (a few microseconds
  of call overhead instead of a compiled kernel's ~100); everything else is handled as under ``compiled``;
* ``compiled``: the fused ops' forward and backward bodies are compiled by ``torch.compile`` (inductor: one C++ loop
  on CPU, one Triton kernel on CUDA) for contiguous float32/float64 tensors of at least ``min_numel`` elements
  (default 2^13, env ``QUANTBENCH_KERNEL_MIN_NUMEL``); smaller tensors, other dtypes and calls made while a whole model
  is being compiled run the bodies eagerly;
* ``eager``: the same bodies, uncompiled;
* ``reference``: each op's reference form, composed from the straight-through primitives of :mod:`quantizers.ste`
  (also used whenever a surrogate tape is active, so the conformance kit sees through the fused ops).

Compiled kernels never crash a run. Tensors are flattened and every per-layer scalar (bounds, level counts) reaches
the kernel as a 0-d tensor, so one compiled kernel per (op variant, dtype, device) serves every layer and bit width:
no recompilation per value. If compiling fails, or a later call hits a recompile limit or any other compiler error,
quantbench warns once and runs that op eagerly from then on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ste import tape_active
from . import native

BACKENDS = ("native", "compiled", "eager", "reference")
_FAST_BACKENDS = ("native", "compiled")
_KERNEL_DTYPES = (torch.float32, torch.float64)
_KERNEL_DEVICES = ("cpu", "cuda")
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


@dataclass
class KernelSettings:
    """How the fused ops run: ``backend`` (see module docstring) and the smallest tensor compiled kernels take."""

    backend: str = "native"
    min_numel: int = 1 << 13


def _settings_from_env() -> KernelSettings:
    backend = os.environ.get("QUANTBENCH_KERNELS", "native").strip().lower() or "native"
    if backend not in BACKENDS:
        warnings.warn(f"QUANTBENCH_KERNELS={backend!r} is not one of {', '.join(BACKENDS)}; using 'native'", stacklevel=2)
        backend = "native"
    try:
        min_numel = int(os.environ.get("QUANTBENCH_KERNEL_MIN_NUMEL", 1 << 13))
    except ValueError:
        min_numel = 1 << 13
    return KernelSettings(backend, max(2, min_numel))


_settings = _settings_from_env()
_compiled: dict[Callable, Callable] = {}
# Keyed by (kernel, device type): a CPU without a C++ compiler says nothing about Triton on the GPU, and back.
_compiled_ok: set[tuple[Callable, str]] = set()  # kernels that ran compiled at least once on that device type
#: kernels that stopped compiling (recompile limit, compiler error): they run eagerly for the rest of the process
_eager_only: set[tuple[Callable, str]] = set()
#: device type -> why compiling never worked there at all (no C++ compiler / Triton): every kernel eager there
_compile_failure: dict[str, str] = {}


def kernel_settings() -> KernelSettings:
    """The settings in force (a copy)."""
    return KernelSettings(_settings.backend, _settings.min_numel)


def set_kernels(backend: str | None = None, min_numel: int | None = None) -> KernelSettings:
    """Choose how fused ops run (process-wide); returns the previous settings. ``min_numel`` is at least 2."""
    previous = kernel_settings()
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        _settings.backend = backend
    if min_numel is not None:
        _settings.min_numel = max(2, int(min_numel))  # sizes 0 and 1 would each specialize a compiled kernel
    return previous


@contextlib.contextmanager
def kernels(backend: str | None = None, min_numel: int | None = None) -> Iterator[KernelSettings]:
    """``set_kernels`` for the duration of a ``with`` block: ``with kernels("reference"): ...``."""
    previous = set_kernels(backend, min_numel)
    try:
        yield kernel_settings()
    finally:
        set_kernels(previous.backend, previous.min_numel)


def reference_active() -> bool:
    """Whether fused ops run their reference form now (a surrogate tape, or the ``reference`` backend)."""
    return tape_active() or _settings.backend == "reference"


def fused_op(reference: Callable) -> Callable[[Callable], Callable]:
    """Decorator for a fused op's public function: its body calls the fused ``autograd.Function``; while
    :func:`reference_active`, ``reference`` (the same maths from the straight-through primitives) runs instead."""

    def wrap(fused: Callable) -> Callable:
        @functools.wraps(fused)
        def op(*args: Any, **kwargs: Any) -> Any:
            return reference(*args, **kwargs) if reference_active() else fused(*args, **kwargs)

        op.reference = reference  # type: ignore[attr-defined]
        return op

    return wrap


def distinct(fn: Callable, tag: str, **flags: Any) -> Callable:
    """A copy of ``fn`` with its own code object and ``flags`` as keyword defaults: torch.compile keeps one cache (and
    recompile budget) per code object, so each variant of an op (signed, with gamma, ...) gets its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}", co_qualname=f"{fn.__qualname__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **flags}
    return copy


_specialized: dict[tuple[Callable, tuple[tuple[str, Any], ...]], Callable] = {}


def specialized(kernel: Callable, **flags: Any) -> Callable:
    """:func:`distinct` with a tag spelled from ``flags``, made once per (kernel, flags): the variant of a kernel for,
    e.g., one chain length (``specialized(_forward_kernel, count=4)``). A plain dict, not ``functools.cache``: a whole
    model compiled with torch.compile traces through this lookup (the variant exists from the eager first step)."""
    key = (kernel, tuple(sorted(flags.items())))
    if key not in _specialized:
        _specialized[key] = distinct(kernel, "_".join(f"{name}{value}" for name, value in key[1]), **flags)
    return _specialized[key]


def native_library(v: Tensor, scalars: tuple[Tensor, ...] = ()) -> Any:
    """The native kernel library when the backend is ``native`` and the operands qualify (a contiguous float32 CPU
    input, float32 scalars, not while a model is being compiled); otherwise None. Forwards decide, and keep the
    decision in ``ctx.lib`` for their backward (which takes the same saved operands)."""
    if _settings.backend != "native" or torch.compiler.is_compiling():
        return None
    if not native.eligible(v) or any(s.dtype != torch.float32 for s in scalars):
        return None
    return native.library()


def scalar_grad(total: float, like: Tensor) -> Tensor:
    """A Python-float gradient sum as a tensor shaped like the parameter ``like``."""
    return torch.tensor(total, dtype=like.dtype, device=like.device).reshape(like.shape)


def param_grad(total: Tensor, like: Tensor) -> Tensor:
    """A summed gradient reshaped and cast like the parameter ``like``."""
    return total.reshape(like.shape).to(like.dtype)


def compiling() -> bool:
    """Whether a whole model is being compiled (the fused ops then use their traced bodies)."""
    return torch.compiler.is_compiling()


def above(x: Tensor) -> Tensor:
    """1.0 where x > 0, 0.0 elsewhere, without a boolean tensor (for the traced bodies; see :mod:`.lsq`)."""
    return torch.clamp(torch.sign(x), 0.0, 1.0)


def _compilable(kernel: Callable, tensors: tuple[Tensor, ...]) -> bool:
    first = tensors[0]
    device = first.device.type
    if _settings.backend not in _FAST_BACKENDS or device in _compile_failure or (kernel, device) in _eager_only:
        return False
    if torch.compiler.is_compiling():
        return False
    if first.numel() < _settings.min_numel or not _dense(first):
        return False
    return all(
        type(t) in _PLAIN_TENSOR_TYPES  # not FakeTensor or other subclasses (tracing, meta): those run eagerly
        and t.dtype == first.dtype and t.dtype in _KERNEL_DTYPES and t.shape == first.shape
        and t.stride() == first.stride() and t.device == first.device and t.device.type in _KERNEL_DEVICES
        for t in tensors
    )


def _dense(tensor: Tensor) -> bool:
    """Every element once, no gaps: contiguous, or channels_last (an elementwise kernel may run in memory order)."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def _flat(tensor: Tensor) -> Tensor:
    """A 1-d alias of a contiguous tensor that is not a view: torch.compile guards on a view's base, whose rank
    differs between layers, so ``view(-1)`` would recompile per rank."""
    return tensor.new_empty(0).set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


def _as_tensor(value: Any, like: Tensor) -> Tensor:
    """A scalar operand as a 0-d tensor on ``like``'s device and dtype: compiled kernels specialize on Python
    numbers (one variant per bit width and sign) but not on tensor values."""
    if isinstance(value, Tensor):
        return value.detach()
    return torch.tensor(value, dtype=like.dtype, device=like.device)


#: inductor's C++ vector width (bits) for a torch CPU capability lowered by ATEN_CPU_CAPABILITY. torch 2.14's inductor
#: on an AVX-512 host under ATEN_CPU_CAPABILITY=avx2 (or default) otherwise emits loops whose stride does not match
#: its vectors: every element past the eighth comes out wrong. 1: scalar code (no vector ISA, as torch's DEFAULT).
_LOWERED_SIMDLEN = {"AVX2": 256, "DEFAULT": 1}


def match_inductor_isa() -> None:
    """Make inductor's CPU code use the vector ISA torch's own kernels run (only when ``ATEN_CPU_CAPABILITY`` is set
    and the user set no ``cpp.simdlen``): call before ``torch.compile``. Imported lazily: inductor's config module
    takes seconds to import."""
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        return
    import torch._inductor.config as inductor_config

    if inductor_config.cpp.simdlen is None:
        inductor_config.cpp.simdlen = _LOWERED_SIMDLEN.get(torch.backends.cpu.get_cpu_capability())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def run_kernel(kernel: Callable, tensors: tuple[Tensor, ...], *scalars: Any, eager: bool = False) -> Any:
    """``kernel(*tensors, *scalars)``: compiled on the flattened tensors when they qualify, otherwise eagerly
    (always eagerly with ``eager=True``: a body not worth compiling, e.g. one inductor would run as a fallback op).

    ``tensors`` are the input-sized operands (same shape); ``scalars`` are 0-d tensors and Python numbers (passed to
    a compiled kernel as 0-d tensors). Input-sized results come back in the input's shape. A compile or recompile
    failure at any point warns once and runs this kernel eagerly from then on.
    """
    if eager or not _compilable(kernel, tensors):
        return kernel(*tensors, *scalars)
    flat = [_flat(t) for t in tensors]
    rest = [_as_tensor(s, tensors[0]) for s in scalars]
    compiled = _compiled.get(kernel)
    try:
        if compiled is None:
            match_inductor_isa()
            compiled = _compiled[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
        result = compiled(*flat, *rest)
    except torch.OutOfMemoryError:
        raise  # a real error of this run, not a compiler problem: running eagerly would hide it
    except Exception as error:  # noqa: BLE001 - no compiler / Triton, a recompile limit, an inductor bug: stay eager
        device = tensors[0].device.type
        _eager_only.add((kernel, device))
        if not any(done == device for _, done in _compiled_ok):  # nothing ever compiled on this device type
            _compile_failure[device] = _first_line(error)
        warnings.warn(
            f"quantbench could not compile its fused quantizer kernel {kernel.__name__} ({_first_line(error)}); "
            "running it eagerly (slower, same results; set QUANTBENCH_KERNELS=eager to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        return kernel(*tensors, *scalars)
    _compiled_ok.add((kernel, tensors[0].device.type))
    shape, stride = tensors[0].shape, tensors[0].stride()  # results in the operands' memory order (channels_last too)
    if isinstance(result, tuple):
        return tuple(r.as_strided(shape, stride) if r.dim() == 1 else r for r in result)
    return result.as_strided(shape, stride)
