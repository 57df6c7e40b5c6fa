"""Native CPU kernels for the activation-sized work of lsq / fixed, pact, qil and n2uq, for DoReFa's weights (PACT's
weight scheme), and for QIL's signed / gamma weights where torch runs its AVX512 or AVX2 kernels (``native_kernels.c``,
which includes ``native_qil_gamma.c`` and ``native_n2uq.c``).

Why C and not only ``torch.compile``: a compiled kernel costs ~100 us of guard and wrapper work per forward+backward,
and a ResNet-20 training step makes 44 such calls; a C function called through ``ctypes`` costs a few microseconds.
The C file is built on first use with the system C compiler (``$CC``, else ``cc``; ``FLAGS`` and ``isa_flags()``
below, with ``-fopenmp``) into ``$QUANTBENCH_CACHE`` (default ``~/.cache/quantbench``), keyed by the source, the flags, the
compiler and the CPU, and loaded with ``ctypes``. OpenMP links to the ``libgomp.so.1`` torch already loaded, so the
kernels share torch's threads. Without a compiler quantbench warns once and uses the compiled or eager kernels.

Only contiguous float32 CPU tensors of plain ``Tensor`` type go native; everything else (CUDA, float64, tracing) takes
the other paths of :mod:`.dispatch`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native_kernels.c")
#: #include-d by SOURCE: part of the build's cache key
INCLUDED = tuple(Path(__file__).with_name(name) for name in ("native_qil_gamma.c", "native_n2uq.c",
                                                             "native_oscillation.c"))
# -ffp-contract=off: no fused multiply-add (bit-identical to torch); -fno-trapping-math: branch-free selects vectorize
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
#: x86-64: the vector ISA the kernels are built for follows the one torch runs (``ATEN_CPU_CAPABILITY`` lowers both),
#: so one AVX-512 host can build and test the AVX-512, AVX2 and plain paths, and none is on where torch's is not
X86_ISA_FLAGS = {"AVX512": ["-march=native"], "AVX2": ["-march=native", "-mno-avx512f"],
                 "DEFAULT": ["-march=native", "-mno-avx"]}


def isa_flags() -> list[str]:
    """The -march flags for this host and torch's CPU capability (x86-64: AVX512, AVX2 or DEFAULT)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["-march=native"]
    return X86_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), X86_ISA_FLAGS["DEFAULT"])
_PLAIN = (Tensor, torch.nn.Parameter)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_vector_math = False  # the QIL gamma / signed kernels are usable (see vector_math)


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench")) / "kernels"


def _cpu_signature() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(compiler: str, target: Path) -> None:
    """Compile to a temporary file and move it into place (atomic: concurrent builders never see half a library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        output = Path(scratch) / target.name
        for extra in (["-fopenmp"], []):  # without OpenMP support, single-threaded kernels
            command = [compiler, *FLAGS, *isa_flags(), *extra, str(SOURCE), "-o", str(output), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(output, target)
                return
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "compiler failed")


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_double
    signatures = {
        "lsq_forward": ([p, p, i64, f32, f32, f32, i32], None),
        "lsq_backward": ([p, p, p, i64, f32, f32, f32, i32, i32], f64),
        "pact_forward": ([p, p, i64, f32, f32, i32, i32], None),
        "pact_backward": ([p, p, p, i64, f32, i32, i32], f64),
        "qil_forward": ([p, p, i64, f32, f32, f32, f32, f32, f32, i32], None),
        "qil_backward": ([p, p, p, i64, f32, f32, f32, f32, p, i32], None),
        "dorefa_forward": ([p, p, i64, f32, f32, i32], None),
        "dorefa_backward": ([p, p, p, i64, f32, i32, i32], None),
        "n2uq_forward": ([p, p, i64, p, i32, f32, f32, i32], None),
        "n2uq_backward": ([p, p, p, i64, p, p, p, i32, f32, f32, p, p, i32], f64),
        "oscillation_step": ([i32, p, p, p, p, p, p, p, p, p, p, f32], i32),
    }
    if hasattr(library, "qil_gamma_forward"):  # built with AVX-512 or AVX2
        signatures["qil_gamma_forward"] = ([p, p, i64, f32, f32, f32, f32, f32, f32, f32, i32, i32, i32], None)
        signatures["qil_gamma_backward"] = ([p, p, p, i64, f32, f32, f32, f32, f32, i32, i32, p, i32], None)
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


#: torch's CPU capability -> (the vector width the kernels must be built with, torch's SLEEF pow and log there)
SLEEF = {"AVX512": (16, "Sleef_powf16_u10", "Sleef_logf16_u10"), "AVX2": (8, "Sleef_powf8_u10", "Sleef_logf8_u10")}


def _connect_vector_math(library: ctypes.CDLL) -> bool:
    """Hand torch's own SLEEF pow / log to the QIL gamma kernels, where that makes them equal torch bit for bit: the
    kernels were built for the vector width of the kernels torch runs (AVX512: 16 lanes, AVX2: 8), which call exactly
    these functions."""
    wanted = SLEEF.get(torch.backends.cpu.get_cpu_capability())
    if wanted is None or not hasattr(library, "qil_gamma_forward"):
        return False
    library.qil_vector_width.argtypes, library.qil_vector_width.restype = [], ctypes.c_int
    width, pow_name, log_name = wanted
    if library.qil_vector_width() != width:
        return False
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        vector_pow, vector_log = getattr(torch_cpu, pow_name), getattr(torch_cpu, log_name)
    except (OSError, AttributeError):
        return False
    library.qil_vector_math.argtypes, library.qil_vector_math.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    return bool(library.qil_vector_math(ctypes.cast(vector_pow, ctypes.c_void_p),
                                        ctypes.cast(vector_log, ctypes.c_void_p)))


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None (after one warning) where they cannot be built."""
    global _library, _failure, _vector_math
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        try:
            compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
            if compiler is None:
                raise RuntimeError("no C compiler (set CC, or install gcc)")
            key = hashlib.sha256(
                b"".join(path.read_bytes() for path in (SOURCE, *INCLUDED)) + " ".join(FLAGS + isa_flags()).encode() + compiler.encode() + _cpu_signature().encode()
            ).hexdigest()[:16]
            target = cache_dir() / f"quantbench_kernels_{key}.so"
            if not target.is_file():
                _build(compiler, target)
            loaded = _declare(ctypes.CDLL(str(target)))
            _vector_math = _connect_vector_math(loaded)
            _library = loaded
        except Exception as error:  # noqa: BLE001 - any build or load failure: fall back, say so once
            _failure = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"quantbench could not build its native CPU kernels ({_failure}); using the compiled or eager kernels "
                "(set QUANTBENCH_KERNELS=compiled to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _library


def vector_math() -> bool:
    """Whether QIL's signed / gamma kernels (``qil_gamma_*``) are available (after ``library()``)."""
    return _vector_math


def failure() -> str | None:
    """Why the native kernels are unavailable (None if they loaded or were never asked for)."""
    return _failure


def eligible(v: Tensor) -> bool:
    """A contiguous float32 CPU tensor of plain Tensor type (not fake / traced)."""
    return type(v) in _PLAIN and v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous()


def _threads() -> int:
    return torch.get_num_threads()


def lsq_forward(lib: ctypes.CDLL, v: Tensor, step: float, lo: float, hi: float) -> Tensor:
    out = torch.empty_like(v)
    lib.lsq_forward(v.data_ptr(), out.data_ptr(), v.numel(), step, lo, hi, _threads())
    return out


def lsq_backward(lib: ctypes.CDLL, grad: Tensor, v: Tensor, step: float, lo: float, hi: float,
                 want_step: bool) -> tuple[Tensor, float]:
    grad_v = torch.empty_like(v)
    total = lib.lsq_backward(grad.data_ptr(), v.data_ptr(), grad_v.data_ptr(), v.numel(), step, lo, hi,
                             int(want_step), _threads())
    return grad_v, total


def pact_forward(lib: ctypes.CDLL, v: Tensor, alpha: float, step: float, signed: bool) -> Tensor:
    out = torch.empty_like(v)
    lib.pact_forward(v.data_ptr(), out.data_ptr(), v.numel(), alpha, step, int(signed), _threads())
    return out


def pact_backward(lib: ctypes.CDLL, grad: Tensor, v: Tensor, alpha: float, signed: bool) -> tuple[Tensor, float]:
    grad_v = torch.empty_like(v)
    total = lib.pact_backward(grad.data_ptr(), v.data_ptr(), grad_v.data_ptr(), v.numel(), alpha, int(signed),
                              _threads())
    return grad_v, total


def qil_forward(lib: ctypes.CDLL, v: Tensor, prune: float, clip: float, mid: float, width: float, q: float,
                out_scale: float | None) -> Tensor:
    out = torch.empty_like(v)
    lib.qil_forward(v.data_ptr(), out.data_ptr(), v.numel(), prune, clip, mid, width, q,
                    1.0 if out_scale is None else out_scale, _threads())
    return out


def qil_backward(lib: ctypes.CDLL, grad: Tensor, v: Tensor, prune: float, clip: float, width: float,
                 out_scale: float | None) -> tuple[Tensor, float, float]:
    grad_v = torch.empty_like(v)
    sums = (ctypes.c_double * 2)()
    lib.qil_backward(grad.data_ptr(), v.data_ptr(), grad_v.data_ptr(), v.numel(), prune, clip, width,
                     1.0 if out_scale is None else out_scale, ctypes.addressof(sums), _threads())
    return grad_v, sums[0], sums[1]


def dorefa_forward(lib: ctypes.CDLL, w: Tensor, levels: float, scale: float) -> Tensor:
    tanh = torch.tanh(w)  # torch's own tanh: the reference's values bit for bit
    out = torch.empty_like(w)
    lib.dorefa_forward(tanh.data_ptr(), out.data_ptr(), w.numel(), levels, scale, _threads())
    return out


def dorefa_backward(lib: ctypes.CDLL, grad: Tensor, w: Tensor, scale: float, detach_max: bool) -> Tensor:
    tanh = torch.tanh(w)
    grad_w = torch.empty_like(w)
    lib.dorefa_backward(grad.data_ptr(), tanh.data_ptr(), grad_w.data_ptr(), w.numel(), scale, int(detach_max),
                        _threads())
    return grad_w


def qil_gamma_forward(lib: ctypes.CDLL, v: Tensor, prune: float, clip: float, mid: float, width: float,
                      gamma: float | None, q: float, out_scale: float | None, signed: bool) -> Tensor:
    out = torch.empty_like(v)
    lib.qil_gamma_forward(v.data_ptr(), out.data_ptr(), v.numel(), prune, clip, mid, width,
                          1.0 if gamma is None else gamma, q, 1.0 if out_scale is None else out_scale, int(signed),
                          int(gamma is not None), _threads())
    return out


def qil_gamma_backward(lib: ctypes.CDLL, grad: Tensor, v: Tensor, prune: float, clip: float, width: float,
                       gamma: float | None, out_scale: float | None, signed: bool) -> tuple[Tensor, float, float, float]:
    grad_v = torch.empty_like(v)
    sums = (ctypes.c_double * 3)()
    lib.qil_gamma_backward(grad.data_ptr(), v.data_ptr(), grad_v.data_ptr(), v.numel(), prune, clip, width,
                           1.0 if gamma is None else gamma, 1.0 if out_scale is None else out_scale, int(signed),
                           int(gamma is not None), ctypes.addressof(sums), _threads())
    return grad_v, sums[0], sums[1], sums[2]


def n2uq_forward(lib: ctypes.CDLL, x: Tensor, midpoints: Tensor, out_step: float, lowest: float) -> Tensor:
    """``out_step * (code + lowest)``, code = how many of the (contiguous float32) ``midpoints`` x exceeds."""
    out = torch.empty_like(x)
    lib.n2uq_forward(x.data_ptr(), out.data_ptr(), x.numel(), midpoints.data_ptr(), midpoints.numel(), out_step,
                     lowest, _threads())
    return out


def n2uq_backward(lib: ctypes.CDLL, grad: Tensor, x: Tensor, midpoints: Tensor, edges: Tensor, widths: Tensor,
                  out_step: float, lowest: float) -> tuple[Tensor, float, Tensor, Tensor]:
    """grad_x, the out_step gradient sum, and per cell (float64) the sums of grad_x and of grad_x * fraction."""
    grad_x = torch.empty_like(x)
    cells = widths.numel()
    per_cell = torch.empty(cells, dtype=torch.float64)
    per_cell_x = torch.empty(cells, dtype=torch.float64)
    total = lib.n2uq_backward(grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), x.numel(), midpoints.data_ptr(),
                              edges.data_ptr(), widths.data_ptr(), cells, out_step, lowest, per_cell.data_ptr(),
                              per_cell_x.data_ptr(), _threads())
    return grad_x, total, per_cell, per_cell_x
