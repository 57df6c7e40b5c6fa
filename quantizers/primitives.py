"""Straight-through primitives that every quantizer is built from, the fused kernels that make them fast, and the
surrogate tape that checks them.

A quantizer's backward pass is deliberately not the derivative of its forward pass: rounding is passed straight
through, some methods refuse to differentiate a parameter in one place (PACT's alpha inside the step), LSQ scales the
step gradient by g. To check such gradients against finite differences we need a function whose true derivative *is*
the intended gradient: the quantizer's **surrogate**, its forward with every straight-through piece frozen at the
evaluation point. Building quantizers from the primitives below gives that surrogate for free:

* ``round_ste(x)``: forward ``round(x)``, gradient 1. Surrogate: ``x + r`` with the residual ``r = round(x0) - x0``
  frozen at the evaluation point ``x0``.
* ``stop_gradient(x)``: forward ``x``, gradient 0. Surrogate: the constant ``x0``.
* ``scale_grad(x, g)``: forward ``x``, gradient times ``g``. Surrogate: ``x0 + g * (x - x0)``.

Fused ops (one ``autograd.Function`` each, whose forward and backward are each one elementwise pass that saves only
the input and the scalar parameters):

* ``lsq_quantize(v, step, qn, qp, g)``: LSQ (equations 1-3 and 5; also the fixed-step baselines);
* ``pact_quantize(v, alpha, qp, signed)``: PACT's clip quantizer (alpha not differentiated inside the step);
* ``dorefa_quantize(w, scale, n, detach_max)``: DoReFa weights (tanh, max, 2 q_k(.) - 1);
* ``qil_quantize(v, prune, clip, distance, gamma, q, signed, out_scale)``: QIL's transformer and discretizer.

Each fused op also has a **reference form**: the same maths composed from the three primitives above (their
surrogate, and the straightforward autograd implementation). It runs when a surrogate tape is active (so the
conformance kit's gradient check sees through the fused ops), inside :func:`reference_mode`, or with
``QUANTBENCH_KERNELS=reference``. Fast and reference forms give identical outputs; gradients agree to rounding
(``tests/test_fast_paths.py``).

Kernels (:func:`set_kernels`, env ``QUANTBENCH_KERNELS`` = ``native`` (default) / ``compiled`` / ``eager`` /
``reference``): with ``native``, contiguous float32 CPU tensors go through the C kernels of ``native.py`` (lsq / fixed,
pact, and qil without gamma: the activation-sized work; a few microseconds of call overhead instead of a compiled
kernel's ~100), and everything else is handled as under ``compiled``. With ``compiled``, the forward and backward bodies of the fused ops are compiled by ``torch.compile`` (inductor: one C++
loop on CPU, one Triton kernel on CUDA) for contiguous float32/float64 tensors of at least ``min_numel`` elements
(default 2^13, env ``QUANTBENCH_KERNEL_MIN_NUMEL``); tensors are flattened, so one compiled kernel per dtype and
device serves every layer shape. Smaller tensors, other dtypes, and any call made while a whole model is being
compiled (``torch.compiler.is_compiling()``: inductor fuses the same bodies into the model's graph) run the bodies
eagerly. If a kernel fails to compile (no C++ compiler, no Triton), quantbench warns once and stays eager.

Inside :func:`record_surrogate` each primitive computes its surrogate form and appends its frozen piece to a tape;
inside :func:`replay_surrogate` the calls, made in the same order, reuse the frozen pieces, so ``forward(v0 + h)`` is
the surrogate evaluated at a perturbed point. ``quantbench.testing`` uses this to compare autograd with central finite
differences for any quantizer, including users' own.
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import native

__all__ = [
    "round_ste",
    "stop_gradient",
    "scale_grad",
    "lsq_quantize",
    "pact_quantize",
    "dorefa_quantize",
    "qil_quantize",
    "record_surrogate",
    "replay_surrogate",
    "reference_mode",
    "set_kernels",
    "kernels",
    "kernel_settings",
    "SurrogateTape",
]


class SurrogateTape:
    """The frozen straight-through pieces of one forward pass, in call order."""

    def __init__(self) -> None:
        self.pieces: list[Tensor] = []
        self.replaying = False
        self._cursor = 0

    def freeze(self, piece: Tensor) -> Tensor:
        """Record ``piece`` (recording) or hand back the piece recorded at this position (replaying)."""
        if not self.replaying:
            self.pieces.append(piece.detach().clone())
            return self.pieces[-1]
        if self._cursor >= len(self.pieces):
            raise RuntimeError(
                "the quantizer made more straight-through calls when replayed than when recorded; "
                "its forward must take the same path for nearby inputs"
            )
        piece = self.pieces[self._cursor]
        self._cursor += 1
        return piece

    def rewind(self) -> None:
        self._cursor = 0


_state = threading.local()


def _active_tape() -> SurrogateTape | None:
    return getattr(_state, "tape", None)


@contextlib.contextmanager
def record_surrogate() -> Iterator[SurrogateTape]:
    """Run forwards in surrogate form, recording the frozen pieces at this evaluation point."""
    tape = SurrogateTape()
    previous, _state.tape = _active_tape(), tape
    try:
        yield tape
    finally:
        _state.tape = previous


@contextlib.contextmanager
def replay_surrogate(tape: SurrogateTape) -> Iterator[SurrogateTape]:
    """Run forwards in surrogate form reusing ``tape``'s frozen pieces (one forward per ``rewind``)."""
    tape.replaying = True
    tape.rewind()
    previous, _state.tape = _active_tape(), tape
    try:
        yield tape
    finally:
        _state.tape = previous


@contextlib.contextmanager
def reference_mode(enabled: bool = True) -> Iterator[None]:
    """Run the fused ops in their reference form (composed from round_ste / stop_gradient / scale_grad) in this
    thread: the straightforward autograd implementation the fast kernels are checked against."""
    previous = getattr(_state, "reference", False)
    _state.reference = bool(enabled)
    try:
        yield
    finally:
        _state.reference = previous


# --------------------------------------------------------------------------------------------------------------
# Kernel selection

BACKENDS = ("native", "compiled", "eager", "reference")
_FAST_BACKENDS = ("native", "compiled")
_KERNEL_DTYPES = (torch.float32, torch.float64)
_KERNEL_DEVICES = ("cpu", "cuda")
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


@dataclass
class KernelSettings:
    """How the fused ops run: ``backend`` (compiled / eager / reference) and the smallest tensor compiled kernels take."""

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
_compiled_ok: set[Callable] = set()
_compile_failure: str | None = None


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
    """``set_kernels`` for the duration of a ``with`` block."""
    previous = set_kernels(backend, min_numel)
    try:
        yield kernel_settings()
    finally:
        set_kernels(previous.backend, previous.min_numel)


def _reference_active() -> bool:
    return _active_tape() is not None or getattr(_state, "reference", False) or _settings.backend == "reference"


def _distinct(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object: torch.compile keeps one cache (and recompile budget) per variant."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}", co_qualname=f"{fn.__qualname__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _native(v: Tensor, scalars: tuple[Tensor, ...] = ()) -> Any:
    """The native kernel library when the backend is ``native`` and the operands qualify (a contiguous float32 CPU
    input, float32 scalars, not while a model is being compiled); otherwise None. Forwards decide, and keep the
    decision in ``ctx.lib`` for their backward (which takes the same saved operands)."""
    if _settings.backend != "native" or torch.compiler.is_compiling():
        return None
    if not native.eligible(v) or any(s.dtype != torch.float32 for s in scalars):
        return None
    return native.library()


def _scalar_grad(total: float, like: Tensor) -> Tensor:
    return torch.tensor(total, dtype=like.dtype, device=like.device).reshape(like.shape)


def _compilable(tensors: tuple[Tensor, ...]) -> bool:
    if _settings.backend not in _FAST_BACKENDS or _compile_failure is not None or torch.compiler.is_compiling():
        return False
    first = tensors[0]
    if first.numel() < _settings.min_numel:
        return False
    return all(
        type(t) in _PLAIN_TENSOR_TYPES  # not FakeTensor or other subclasses (tracing, meta): those run eagerly
        and t.dtype == first.dtype and t.dtype in _KERNEL_DTYPES and t.shape == first.shape and t.is_contiguous()
        and t.device == first.device and t.device.type in _KERNEL_DEVICES
        for t in tensors
    )


def _flat(tensor: Tensor) -> Tensor:
    """A 1-d alias of a contiguous tensor that is not a view: torch.compile guards on a view's base, whose rank
    differs between layers, so ``view(-1)`` would recompile per rank."""
    return tensor.new_empty(0).set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


def _run(kernel: Callable, tensors: tuple[Tensor, ...], *scalars: Any) -> Any:
    """``kernel(*tensors, *scalars)``: compiled on the flattened tensors when they qualify, otherwise eagerly.

    ``tensors`` are the input-sized operands (same shape); ``scalars`` are 0-d tensors and Python numbers.
    Input-sized results come back in the input's shape.
    """
    global _compile_failure
    if not _compilable(tensors):
        return kernel(*tensors, *scalars)
    flat = [_flat(t) for t in tensors]
    rest = [s.detach() if isinstance(s, Tensor) else s for s in scalars]
    try:
        compiled = _compiled.get(kernel)
        if compiled is None:
            compiled = _compiled[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
        result = compiled(*flat, *rest)
    except Exception as error:  # noqa: BLE001 - a kernel that never compiled: no compiler / Triton here
        if kernel in _compiled_ok:
            raise
        _compile_failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        warnings.warn(
            f"quantbench could not compile its fused quantizer kernels ({_compile_failure}); running them eagerly "
            "(slower; set QUANTBENCH_KERNELS=eager to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        return kernel(*tensors, *scalars)
    _compiled_ok.add(kernel)
    shape = tensors[0].shape
    if isinstance(result, tuple):
        return tuple(r.view(shape) if r.dim() == 1 else r for r in result)
    return result.view(shape)


# --------------------------------------------------------------------------------------------------------------
# The three primitives


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even, as ``torch.round``) with a straight-through (identity) gradient."""
    tape = _active_tape()
    if tape is None:
        return _RoundSTE.apply(x)
    residual = tape.freeze(torch.round(x) - x)
    return x + residual


def stop_gradient(x: Tensor) -> Tensor:
    """``x`` in the forward pass, no gradient in the backward pass (a piece the method does not differentiate)."""
    tape = _active_tape()
    if tape is None:
        return x.detach()
    return tape.freeze(x)


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass; the gradient reaching ``x`` is multiplied by ``scale`` (LSQ's gradscale)."""
    tape = _active_tape()
    if tape is None:
        if scale == 1.0:
            return x
        return _ScaleGrad.apply(x, scale)
    anchor = tape.freeze(x)
    return anchor + scale * (x - anchor)


def _param_grad(total: Tensor, like: Tensor) -> Tensor:
    return total.reshape(like.shape).to(like.dtype)


# Backward bodies for a whole model under torch.compile ("traced" bodies). Inductor fuses them into the model's
# graph, and AOTAutograd's partitioner saves for backward whatever is cheapest: a boolean mask computed from the input
# alone (1 byte) beats the input (4 bytes), but storing booleans from a vectorized CPU kernel is very slow in torch
# 2.15's inductor (~30x a float store). The traced bodies therefore build their masks arithmetically, as floats
# (1.0 / 0.0 from sign and clamp: exact, since x - y > 0 exactly when x > y), so no boolean tensor is worth saving and
# the partitioner keeps the input. They equal the eager bodies except for NaN/inf inputs or upstream gradients (NaN
# where the eager bodies give 0).


def _above(x: Tensor) -> Tensor:
    """1.0 where x > 0, 0.0 elsewhere, without a boolean tensor."""
    return torch.clamp(torch.sign(x), 0.0, 1.0)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------------------
# LSQ (and the fixed-step baselines): eq. 1-2 forward, eq. 3 and 5 backward


def _lsq_forward_kernel(v: Tensor, step: Tensor, lo: float, hi: float) -> Tensor:
    # .to(v.dtype): a 0-d input and a 0-d float32 step would otherwise promote (bfloat16 -> float32)
    return (torch.clamp(torch.round(v / step), lo, hi) * step).to(v.dtype)


def _lsq_backward_terms(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """grad_v and the per-element terms of the step gradient (summed by the callers)."""
    z = v / step
    inside = (z > lo) & (z < hi)  # strict interior on the unrounded v/s (paper eq. 3, 5)
    grad_v = torch.where(inside, grad, 0.0)
    # eq. 3 in one expression: clamp(round(z)) - z inside, the clip code lo / hi outside.
    # torch.where (not a multiply by the mask) keeps +-inf inputs from turning into NaN.
    dvhat_dstep = torch.clamp(torch.round(z), lo, hi) - torch.where(inside, z, 0.0)
    return grad_v, grad * dvhat_dstep


def _lsq_backward_kernel(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    grad_v, terms = _lsq_backward_terms(grad, v, step, lo, hi)
    return grad_v, terms.sum()


def _per_channel_then_total(terms: Tensor) -> Tensor:
    """``terms.sum()`` as per-channel sums (dim 1) first: in a whole compiled model inductor can then fuse this
    reduction into the loops of the neighbouring BatchNorm backward's per-channel sums instead of making another pass
    over the activation."""
    if terms.dim() < 3:
        return terms.sum()
    return terms.sum(dim=[d for d in range(terms.dim()) if d != 1]).sum()


def _lsq_backward_traced(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    grad_v, terms = _lsq_backward_terms(grad, v, step, lo, hi)
    return grad_v, _per_channel_then_total(terms)


def _clip_backward_kernel(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> Tensor:
    z = v / step
    return torch.where((z > lo) & (z < hi), grad, 0.0)


def _clip_backward_traced(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> Tensor:
    z = v / step
    return grad * (_above(z - lo) * _above(hi - z))


class _LSQQuantize(torch.autograd.Function):
    """LSQ forward (eq. 1-2) and backward (eq. 3 and 5): saves only the input and the step."""

    @staticmethod
    def forward(ctx, v: Tensor, step: Tensor, lo: float, hi: float, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, step)
        ctx.lo, ctx.hi, ctx.grad_scale = lo, hi, grad_scale
        ctx.lib = lib = _native(v, scalars=(step,))
        if lib is not None:
            return native.lsq_forward(lib, v, float(step), lo, hi)
        return _run(_lsq_forward_kernel, (v,), step, lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, step = ctx.saved_tensors
        grad_v = grad_step = None
        lib = ctx.lib
        if lib is not None:
            want_step = ctx.needs_input_grad[1]
            grad_v, total = native.lsq_backward(lib, grad.contiguous(), v, float(step), ctx.lo, ctx.hi, want_step)
            grad_step = _scalar_grad(total * ctx.grad_scale, step) if want_step else None
        elif ctx.needs_input_grad[1] and _compiling():
            grad_v, total = _lsq_backward_traced(grad, v, step, ctx.lo, ctx.hi)
            grad_step = _param_grad(total * ctx.grad_scale, step)
        elif ctx.needs_input_grad[1]:
            grad_v, total = _run(_lsq_backward_kernel, (grad, v), step, ctx.lo, ctx.hi)
            grad_step = _param_grad(total * ctx.grad_scale, step)
        elif ctx.needs_input_grad[0]:
            kernel = _clip_backward_traced if _compiling() else _clip_backward_kernel
            grad_v = _run(kernel, (grad, v), step, ctx.lo, ctx.hi)
        return (grad_v if ctx.needs_input_grad[0] else None), grad_step, None, None, None


def lsq_quantize(v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """LSQ's quantizer ``clamp(round(v/step), -qn, qp) * step`` with the paper's gradients.

    ``qn`` is the paper's Q_N (a non-negative count of negative levels), ``grad_scale`` is g, applied to the step
    gradient only. ``step`` must be positive (callers guard it).
    """
    if _reference_active():
        step = scale_grad(step, grad_scale)
        return (round_ste(torch.clamp(v / step, -qn, qp)) * step).to(v.dtype)
    return _LSQQuantize.apply(v, step, float(-qn), float(qp), float(grad_scale))


# --------------------------------------------------------------------------------------------------------------
# PACT's clip quantizer: y = clip(v, 0 or -alpha, alpha), round(y / step) * step with step = alpha / Q_P held constant


def _pact_forward_kernel(v: Tensor, alpha: Tensor, step: Tensor, *, signed: bool = False) -> Tensor:
    # x == alpha belongs to the alpha branch (PACT eq. 3) and x = 0 to the identity branch.
    inner = torch.where(v <= -alpha, -alpha, v) if signed else torch.where(v >= 0, v, 0.0)
    clipped = torch.where(v >= alpha, alpha, inner)
    return (torch.round(clipped / step) * step).to(v.dtype)


def _pact_backward_kernel(grad: Tensor, v: Tensor, alpha: Tensor, *, signed: bool = False) -> tuple[Tensor, Tensor]:
    upper = v >= alpha
    if signed:
        lower = v <= -alpha
        grad_v = torch.where(upper | lower, 0.0, grad)
        grad_alpha = torch.where(upper, grad, torch.where(lower, -grad, 0.0))
    else:
        grad_v = torch.where((v >= 0) & ~upper, grad, 0.0)
        grad_alpha = torch.where(upper, grad, 0.0)
    return grad_v, grad_alpha.sum()


def _pact_backward_traced(grad: Tensor, v: Tensor, alpha: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    upper = 1.0 - _above(alpha - v)  # v >= alpha
    if signed:
        lower = 1.0 - _above(v + alpha)  # v <= -alpha
        return grad * ((1.0 - upper) * (1.0 - lower)), (grad * (upper - lower * (1.0 - upper))).sum()
    nonnegative = 1.0 - _above(-v)  # v >= 0
    return grad * (nonnegative * (1.0 - upper)), (grad * upper).sum()


_PACT_KERNELS = {
    signed: (
        _distinct(_pact_forward_kernel, f"s{int(signed)}"),
        _distinct(_pact_backward_kernel, f"s{int(signed)}"),
    )
    for signed in (False, True)
}
for _signed, (_forward, _backward) in _PACT_KERNELS.items():
    _forward.__kwdefaults__ = {"signed": _signed}
    _backward.__kwdefaults__ = {"signed": _signed}


class _PACTQuantize(torch.autograd.Function):
    """PACT forward and backward (dy/dx = 1 inside the clip range, dy/dalpha = 1 at or above alpha, -1 at or below
    -alpha when signed): saves only the input and alpha."""

    @staticmethod
    def forward(ctx, v: Tensor, alpha: Tensor, qp: int, signed: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, alpha)
        ctx.signed = signed
        step = alpha / qp
        ctx.lib = lib = _native(v, scalars=(alpha,))
        if lib is not None:
            return native.pact_forward(lib, v, float(alpha), float(step), signed)
        forward_kernel, _ = _PACT_KERNELS[signed]
        return _run(forward_kernel, (v,), alpha, step)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, alpha = ctx.saved_tensors
        lib = ctx.lib
        if lib is not None:
            grad_v, total = native.pact_backward(lib, grad.contiguous(), v, float(alpha), ctx.signed)
            total = _scalar_grad(total, alpha)
        elif _compiling():
            grad_v, total = _pact_backward_traced(grad, v, alpha, ctx.signed)
        else:
            _, backward_kernel = _PACT_KERNELS[ctx.signed]
            grad_v, total = _run(backward_kernel, (grad, v), alpha)
        grad_alpha = _param_grad(total, alpha) if ctx.needs_input_grad[1] else None
        return (grad_v if ctx.needs_input_grad[0] else None), grad_alpha, None, None


def pact_quantize(v: Tensor, alpha: Tensor, qp: int, signed: bool = False) -> Tensor:
    """PACT's quantizer: clip ``v`` to [0, alpha] ([-alpha, alpha] when signed), then ``Q_P`` uniform steps.

    ``alpha`` (positive, 0-d) gets PACT's gradient; it is not differentiated inside the step ``alpha / qp``.
    """
    if _reference_active():
        # Explicit branches (not clamp, whose subgradient at the bound changed across torch versions): x == alpha
        # belongs to the alpha branch (PACT eq. 3) and x = 0 to the identity branch (dy/dx = 1 on [0, alpha)).
        if signed:
            inner = torch.where(v <= -alpha, -alpha, v)
        else:
            inner = torch.where(v >= 0, v, torch.zeros_like(v))
        clipped = torch.where(v >= alpha, alpha, inner)
        step = stop_gradient(alpha) / qp  # PACT does not differentiate alpha inside the step
        return (round_ste(clipped / step) * step).to(v.dtype)
    return _PACTQuantize.apply(v, alpha, qp, bool(signed))


# --------------------------------------------------------------------------------------------------------------
# DoReFa weights (PACT's weight scheme): 2 * q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1, times an output scale


def _dorefa_forward_kernel(w: Tensor, scale: Tensor, n: float) -> Tensor:
    t = torch.tanh(w)
    peak = t.abs().max().clamp_min(1e-12)
    unit = torch.clamp(t / (2 * peak) + 0.5, 0.0, 1.0)
    codes = torch.round(unit * n) / n
    return ((2 * codes - 1) * scale).to(w.dtype)


def _dorefa_backward_kernel(grad: Tensor, w: Tensor, scale: Tensor, *, detach_max: bool = False) -> Tensor:
    t = torch.tanh(w)  # recomputed: only the weight is saved
    magnitude = t.abs()
    raw_peak = magnitude.max()
    twice_peak = 2 * raw_peak.clamp_min(1e-12)
    unsat = t / twice_peak + 0.5
    # d out / d unit = 2 * scale (round straight through); clamp(., 0, 1) passes the open interval only
    grad_unit = torch.where((unsat > 0.0) & (unsat < 1.0), grad * (2 * scale), 0.0)
    grad_t = grad_unit / twice_peak
    if not detach_max:
        # unit = t / (2 peak): d/d peak = -2 t / (2 peak)^2, passed by clamp_min only above its bound; max's
        # gradient is shared by its ties; |t| -> sign(t)
        grad_peak = -(grad_unit * t).sum() * 2 / (twice_peak * twice_peak)
        grad_peak = torch.where(raw_peak > 1e-12, grad_peak, 0.0)
        ties = magnitude == raw_peak
        grad_t = grad_t + torch.where(ties, grad_peak / ties.sum() * torch.sign(t), 0.0)
    return (grad_t * (1 - t * t)).to(w.dtype)  # tanh' = 1 - tanh^2


def _dorefa_backward_traced(grad: Tensor, w: Tensor, scale: Tensor, detach_max: bool) -> Tensor:
    t = torch.tanh(w)
    magnitude = t.abs()
    raw_peak = magnitude.max()
    twice_peak = 2 * raw_peak.clamp_min(1e-12)
    unsat = t / twice_peak + 0.5
    grad_unit = grad * (2 * scale) * (_above(unsat) * _above(1.0 - unsat))
    grad_t = grad_unit / twice_peak
    if not detach_max:
        grad_peak = -(grad_unit * t).sum() * 2 / (twice_peak * twice_peak) * _above(raw_peak - 1e-12)
        ties = 1.0 - _above(raw_peak - magnitude)  # magnitude == max
        grad_t = grad_t + ties * (grad_peak / ties.sum() * torch.sign(t))
    return (grad_t * (1 - t * t)).to(w.dtype)


_DOREFA_BACKWARD = {flag: _distinct(_dorefa_backward_kernel, f"d{int(flag)}") for flag in (False, True)}
for _flag, _kernel in _DOREFA_BACKWARD.items():
    _kernel.__kwdefaults__ = {"detach_max": _flag}


class _DoReFaQuantize(torch.autograd.Function):
    """DoReFa forward and its tensorpack gradient (through tanh and the max), recomputing tanh in backward so that
    only the weight is saved."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, n: int, detach_max: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w, scale)
        ctx.detach_max = detach_max
        ctx.lib = lib = _native(w, scalars=(scale,))
        if lib is not None:
            return native.dorefa_forward(lib, w, float(n), float(scale))
        return _run(_dorefa_forward_kernel, (w,), scale, float(n))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        w, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            grad_w = None
        elif ctx.lib is not None:
            grad_w = native.dorefa_backward(ctx.lib, grad.contiguous(), w, float(scale), ctx.detach_max)
        elif _compiling():
            grad_w = _dorefa_backward_traced(grad, w, scale, ctx.detach_max)
        else:
            grad_w = _run(_DOREFA_BACKWARD[ctx.detach_max], (grad, w), scale)
        return grad_w, None, None, None


def dorefa_quantize(w: Tensor, scale: Tensor, n: int, detach_max: bool = False) -> Tensor:
    """DoReFa's k-bit weights ``(2 q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1) * scale`` with ``n = 2^k - 1`` steps;
    the gradient goes through tanh and (unless ``detach_max``) the max, ``scale`` is a constant."""
    if _reference_active():
        t = torch.tanh(w)
        peak = t.abs().max().clamp_min(1e-12)
        if detach_max:
            peak = stop_gradient(peak)
        unit = torch.clamp(t / (2 * peak) + 0.5, 0.0, 1.0)  # in [0, 1] already; the clamp guards rounding error
        codes = round_ste(unit * n) / n
        return ((2 * codes - 1) * scale).to(w.dtype)
    return _DoReFaQuantize.apply(w, scale, n, bool(detach_max))


# --------------------------------------------------------------------------------------------------------------
# QIL: transformer (interval [prune, clip] onto [0, 1], optional exponent gamma) and discretizer round(x * q) / q


def _qil_forward_kernel(
    v: Tensor, prune: Tensor, clip: Tensor, mid: Tensor, width: Tensor, gamma: Tensor, out_scale: Tensor, q: float,
    *, signed: bool = False, has_gamma: bool = False, has_scale: bool = False,
) -> Tensor:
    magnitude = v.abs() if signed else v
    inside = (magnitude > prune) & (magnitude <= clip)
    unit = (torch.where(inside, magnitude, mid) - prune) / width
    if has_gamma:
        unit = unit**gamma
    transformed = torch.where(magnitude > clip, 1.0, torch.where(inside, unit, 0.0))
    if signed:
        transformed = transformed * torch.sign(v)
    discretized = torch.round(transformed * q) / q
    if has_scale:
        discretized = discretized * out_scale
    return discretized.to(v.dtype)


def _qil_backward_kernel(
    grad: Tensor, v: Tensor, prune: Tensor, clip: Tensor, width: Tensor, gamma: Tensor, out_scale: Tensor,
    *, signed: bool = False, has_gamma: bool = False, has_scale: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    magnitude = v.abs() if signed else v
    inside = (magnitude > prune) & (magnitude <= clip)
    base = (magnitude - prune) / width  # in (0, 1] inside; outside it is masked out below
    upstream = grad * out_scale if has_scale else grad  # round straight through: d x_bar / d transformed = 1
    if signed:
        upstream = upstream * torch.sign(v)
    if has_gamma:
        grad_base = torch.where(inside, upstream * (gamma * base ** (gamma - 1)), 0.0)
        grad_gamma = torch.where(inside, upstream * (base**gamma * torch.log(base)), 0.0).sum()
    else:
        grad_base = torch.where(inside, upstream, 0.0)
        grad_gamma = grad_base.new_zeros(())
    grad_magnitude = grad_base / width
    grad_v = grad_magnitude * torch.sign(v) if signed else grad_magnitude
    grad_prune = -grad_magnitude.sum()
    grad_width = -torch.where(inside, grad_magnitude * base, 0.0).sum()
    return grad_v, grad_prune, grad_width, grad_gamma


def _qil_backward_traced(
    grad: Tensor, v: Tensor, prune: Tensor, clip: Tensor, width: Tensor, gamma: Tensor | None,
    out_scale: Tensor | None, signed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    magnitude = v.abs() if signed else v
    inside = _above(magnitude - prune) * (1.0 - _above(magnitude - clip))  # prune < m <= clip
    # outside the interval evaluate at its middle (finite pow / log), as the forward does; exact inside
    middle = (prune + clip) / 2
    safe = torch.clamp(magnitude, prune, clip) * inside + middle * (1.0 - inside)
    base = (safe - prune) / width
    upstream = grad * out_scale if out_scale is not None else grad
    if signed:
        upstream = upstream * torch.sign(v)
    if gamma is not None:
        grad_base = upstream * (gamma * base ** (gamma - 1)) * inside
        grad_gamma = (upstream * (base**gamma * torch.log(base)) * inside).sum()
    else:
        grad_base = upstream * inside
        grad_gamma = grad_base.new_zeros(())
    grad_magnitude = grad_base / width
    grad_v = grad_magnitude * torch.sign(v) if signed else grad_magnitude
    return grad_v, -grad_magnitude.sum(), -(grad_magnitude * base).sum(), grad_gamma


def _qil_variants() -> dict[tuple[bool, bool, bool], tuple[Callable, Callable]]:
    variants = {}
    for signed in (False, True):
        for has_gamma in (False, True):
            for has_scale in (False, True):
                flags = {"signed": signed, "has_gamma": has_gamma, "has_scale": has_scale}
                tag = f"s{int(signed)}g{int(has_gamma)}c{int(has_scale)}"
                forward, backward = _distinct(_qil_forward_kernel, tag), _distinct(_qil_backward_kernel, tag)
                forward.__kwdefaults__, backward.__kwdefaults__ = dict(flags), dict(flags)
                variants[(signed, has_gamma, has_scale)] = (forward, backward)
    return variants


_QIL_KERNELS = _qil_variants()


def _native_qil(flags: tuple[bool, bool, bool], v: Tensor, *scalars: Tensor | None) -> Any:
    """Native QIL: unsigned without gamma (its activations) everywhere the kernels build; signed or with gamma (its
    weights) where the vector kernels equal torch's pow bit for bit (``native.vector_math``)."""
    signed, has_gamma, _ = flags
    lib = _native(v, scalars=tuple(s for s in scalars if s is not None))
    if lib is None or not (signed or has_gamma) or native.vector_math():
        return lib
    return None


class _QILQuantize(torch.autograd.Function):
    """QIL forward and backward (transformer differentiated exactly inside the interval, discretizer straight
    through, output scale constant): saves only the input and the interval's scalars."""

    @staticmethod
    def forward(ctx, v, prune, clip, distance, gamma, out_scale, q, signed):  # type: ignore[override]
        ctx.save_for_backward(v, prune, clip, distance, gamma, out_scale)
        ctx.flags = (bool(signed), gamma is not None, out_scale is not None)
        ctx.lib = lib = _native_qil(ctx.flags, v, prune, clip, distance, gamma, out_scale)
        if lib is not None:
            # In Python floats: 2 * distance is exact; mid only stands in for outside elements, whose output is
            # 0 or 1 whatever it is.
            low, high, width = float(prune), float(clip), 2.0 * float(distance)
            scale = None if out_scale is None else float(out_scale)
            if signed or gamma is not None:
                return native.qil_gamma_forward(lib, v, low, high, (low + high) / 2, width,
                                                None if gamma is None else float(gamma), float(q), scale, signed)
            return native.qil_forward(lib, v, low, high, (low + high) / 2, width, float(q), scale)
        forward_kernel, _ = _QIL_KERNELS[ctx.flags]
        mid, width = (prune + clip) / 2, 2 * distance
        dummy = v.new_ones(()) if gamma is None or out_scale is None else None
        return _run(
            forward_kernel, (v,), prune, clip, mid, width, dummy if gamma is None else gamma,
            dummy if out_scale is None else out_scale, float(q),
        )

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, prune, clip, distance, gamma, out_scale = ctx.saved_tensors
        lib = ctx.lib
        if lib is not None:
            interval = (float(prune), float(clip), 2.0 * float(distance))
            scale = None if out_scale is None else float(out_scale)
            if ctx.flags[0] or gamma is not None:
                grad_v, sum_grad, sum_base, sum_gamma = native.qil_gamma_backward(
                    lib, grad.contiguous(), v, *interval, None if gamma is None else float(gamma), scale, ctx.flags[0]
                )
            else:
                grad_v, sum_grad, sum_base = native.qil_backward(lib, grad.contiguous(), v, *interval, scale)
                sum_gamma = 0.0
            grad_prune, grad_width = _scalar_grad(-sum_grad, prune), _scalar_grad(-sum_base, distance)
            grad_gamma = None if gamma is None else _scalar_grad(sum_gamma, gamma)
        elif _compiling():
            grad_v, grad_prune, grad_width, grad_gamma = _qil_backward_traced(
                grad, v, prune, clip, 2 * distance, gamma, out_scale, ctx.flags[0]
            )
        else:
            _, backward_kernel = _QIL_KERNELS[ctx.flags]
            dummy = v.new_ones(()) if gamma is None or out_scale is None else None
            grad_v, grad_prune, grad_width, grad_gamma = _run(
                backward_kernel, (grad, v), prune, clip, 2 * distance, dummy if gamma is None else gamma,
                dummy if out_scale is None else out_scale,
            )
        needs = ctx.needs_input_grad
        return (
            grad_v if needs[0] else None,
            _param_grad(grad_prune, prune) if needs[1] else None,
            None,
            _param_grad(2 * grad_width, distance) if needs[3] else None,
            _param_grad(grad_gamma, gamma) if gamma is not None and needs[4] else None,
            None,
            None,
            None,
        )


def qil_quantize(
    v: Tensor, prune: Tensor, clip: Tensor, distance: Tensor, gamma: Tensor | None, q: int, signed: bool,
    out_scale: Tensor | None = None,
) -> Tensor:
    """QIL: ``round(T(v) * q) / q`` (times the constant ``out_scale``), with the transformer ``T`` mapping the
    interval (prune, clip] of ``|v|`` (signed) or ``v`` linearly onto (0, 1], raised to ``gamma`` when given: 0 below
    the interval, 1 above (times sign(v) when signed). ``distance`` is the half-width: ``clip - prune = 2 distance``.
    """
    if _reference_active():
        magnitude = v.abs() if signed else v
        # Interior per QIL eq. 3/5: prune below c - d, clip above c + d (the end points give the same values).
        inside = (magnitude > prune) & (magnitude <= clip)
        # Outside elements are evaluated at the interval's middle: masked anyway, but this keeps their (zero)
        # gradients finite for +-inf inputs and for gamma's log(u).
        safe = torch.where(inside, magnitude, ((prune + clip) / 2).detach())
        unit = (safe - prune) / (2 * distance)
        if gamma is not None:
            unit = unit**gamma
        transformed = torch.where(
            magnitude > clip, torch.ones_like(unit), torch.where(inside, unit, torch.zeros_like(unit))
        )
        if signed:
            transformed = transformed * torch.sign(v)
        discretized = round_ste(transformed * q) / q
        if out_scale is not None:
            discretized = discretized * stop_gradient(out_scale)
        return discretized.to(v.dtype)
    return _QILQuantize.apply(v, prune, clip, distance, gamma, out_scale, q, bool(signed))
