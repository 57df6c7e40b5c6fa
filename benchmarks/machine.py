"""The machine a benchmark ran on, the allocator setting every contender shares, interleaved timing, and the report
files a benchmark writes."""

from __future__ import annotations

import ctypes
import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantizers.kernels import dispatch, native



def warm_allocator() -> str:
    """Keep freed memory in the process (glibc): no mmap, no trimming, one arena. Returns what was done.

    Without this, whether a step pays for page faults depends on where glibc's adaptive thresholds happen to sit
    (measured here: 0 faults per full-precision ResNet-20 step, ~4,000-10,000 per quantized one, and 2^24-element
    tensors mmapped and faulted in on every call), which measures the allocator, not the quantizer. With this
    setting no contender page-faults in steady state. Every contender runs in this one process under it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
        ok = (libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
              and libc.mallopt(m_arena_max, 1) == 1)
        return ("glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB, M_ARENA_MAX=1)" if ok
                else "mallopt refused: default allocator")
    except OSError:
        return "not glibc: default allocator"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def kernels_description(settings: dispatch.KernelSettings) -> str:
    compiled = f"compiled for >= {settings.min_numel} elements"
    if settings.backend != "native":
        return f"{settings.backend} ({compiled})"
    built = "built" if native.library() is not None else f"unavailable: {native.failure()}"
    qil = "native (torch's SLEEF pow/log)" if native.vector_math() else "compiled (no AVX-512 vector math)"
    return f"native: native C for float32 CPU tensors ({built}; QIL signed/gamma weights {qil}), else {compiled}"


def machine_info(allocator: str) -> dict[str, Any]:
    settings = dispatch.kernel_settings()
    return {
        "cpu": cpu_model(),
        # the vector ISA torch's kernels run (and lsq's native C is built for, -march=native): ratios depend on it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "allocator": allocator,
        "kernels": kernels_description(settings),
        "command": "python -m benchmarks.quantizers " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]),
        "load_average_start": load_average(),
    }


def interleaved(runners: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run every runner once per round, rotating the order each round; returns the timed rounds."""
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = runners[name]()
            if index >= warmup:
                samples[name].append(elapsed)
    return samples


def write_text_report(out: str | Path, name: str, frame: Any, text: str, module: str,
                      argv: list[str] | None) -> None:
    """``out/name.csv`` (the frame) and ``out/name.md``: the command that made it, then ``text`` verbatim."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / f"{name}.csv", index=False)
    command = " ".join([f"python -m {module}", *(argv or sys.argv[1:])])
    (folder / f"{name}.md").write_text(f"Made by `{command}`.\n\n```\n{text}\n```\n")
