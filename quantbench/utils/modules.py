"""Model surgery and probing shared by quantization, analyses and export: replace a submodule by name, and capture
the inputs that named layers receive on one batch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def capture_inputs(model: nn.Module, layers: Mapping[str, nn.Module], batch: Tensor) -> dict[str, Tensor]:
    """The first input each of ``layers`` receives when ``model`` runs on ``batch`` (no grad, detached)."""
    captured: dict[str, Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda module, args, name=name: captured.setdefault(name, args[0].detach()))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def topk_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image hits for top-1 and top-5 (top-k with k = min(5, classes)) as boolean tensors on the logits' device."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return top[:, 0] == labels, (top == labels[:, None]).any(dim=1)


def accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent."""
    top1, top5 = topk_correct(logits, labels)
    total = labels.numel()
    return {"top1": 100.0 * int(top1.sum()) / total, "top5": 100.0 * int(top5.sum()) / total}
