"""What a run records beside its config: package versions and machine (``environment.json``), and the settings that
decide its numbers beyond the config (device, mixed precision, TF32 and determinism flags, world size)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from quantbench.training.distributed import Context


def environment() -> dict[str, Any]:
    import torchvision

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "quantbench": __import__("quantbench").__version__,
        "git_commit": commit or "unknown",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def numerics(device: torch.device, amp: str, context: Context) -> dict[str, Any]:
    """What decides the numbers beyond the config: device, precision, TF32 and determinism flags, world size."""
    return {
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "amp": amp,
        "world_size": context.world_size,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that supports it, else off; fp16 and bf16 on CPU are allowed when asked for."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
