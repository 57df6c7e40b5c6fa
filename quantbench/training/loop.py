"""The training loop: one epoch of SGD with the recipe's LR schedule, and evaluation. Everything that trains a model
(``quantbench train``, ``compare``, the Figure 4 measurement) runs through ``train_one_epoch``; what differs between
them is a per-step callback (called after backward, before the optimizer step) and where the epoch stops."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from quantbench.config import TrainConfig, paper_lr
from quantbench.qat import quantizer_parameters, regularization
from quantbench.utils.modules import topk_correct

#: ``callback(step, loss, logits, labels)``: step is the global iteration; gradients are in ``.grad``
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def epoch_loader(data: Any, config: TrainConfig, epoch: int) -> DataLoader:
    """The training batches of one epoch, in an order that depends only on (seed, epoch), so a resumed run and
    every quantizer of a comparison see the same batches."""
    order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    return DataLoader(data.train, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=order,
                      num_workers=config.workers)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum; quantizer parameters in their own group, without weight decay unless asked for."""
    config = config.with_paper_defaults()
    quantizer_ids = {id(p) for p in quantizer_parameters(model)}
    weights = [p for p in model.parameters() if id(p) not in quantizer_ids]
    groups = [{"params": weights, "weight_decay": config.weight_decay, "name": "weights"}]
    if quantizer_ids:
        groups.append({
            "params": quantizer_parameters(model),
            "weight_decay": config.weight_decay if config.quantizer_weight_decay else 0.0,
            "name": "quantizers",
        })
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Cosine decay without restarts (per iteration), or x0.1 at 1/3 and 2/3 of training."""
    lr = paper_lr(config.bits) if config.lr is None else config.lr  # no config rebuild (and re-validation) per step
    progress = step / max(1, total_steps)
    if config.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (0.1 ** (int(progress >= 1 / 3) + int(progress >= 2 / 3)))


def distillation_loss(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Cross-entropy against the teacher's softened distribution (Hinton et al.; LSQ section 3.7 uses T = 1)."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    return -(soft_targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean() * temperature**2


@dataclass
class Trainer:
    """What one epoch needs: the model (and the module to call, e.g. its compiled form), optimizer, recipe, device."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device
    steps_per_epoch: int
    teacher: nn.Module | None = None
    forward: nn.Module | Callable | None = None  # what to call for logits; defaults to model


def train_one_epoch(trainer: Trainer, loader: DataLoader, epoch: int, on_step: StepCallback | None = None,
                    max_steps: int | None = None, progress: Callable[[float, float], None] | None = None
                    ) -> dict[str, float]:
    """One epoch (or its first ``max_steps`` iterations); returns mean train loss and top-1 over the steps run."""
    model, optimizer, config = trainer.model, trainer.optimizer, trainer.config
    forward = trainer.forward or model
    total_steps = trainer.steps_per_epoch * config.epochs
    steps = min(trainer.steps_per_epoch, max_steps or trainer.steps_per_epoch)
    model.train()
    loss_sum = correct = seen = 0.0
    for index, (images, labels) in enumerate(loader):
        if index >= steps:
            break
        step = epoch * trainer.steps_per_epoch + index
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step, total_steps)
        images, labels = images.to(trainer.device), labels.to(trainer.device)
        logits = forward(images)
        loss = F.cross_entropy(logits, labels)
        if trainer.teacher is not None:
            with torch.no_grad():
                teacher_logits = trainer.teacher(images)
            kd = distillation_loss(logits, teacher_logits, config.distill_temperature)
            loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
        loss = loss + regularization(model).to(loss.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if on_step is not None:
            on_step(step, loss, logits, labels)
        optimizer.step()
        if config.compile and forward is model:
            forward = trainer.forward = torch.compile(model)  # after one eager step: quantizers initialize eagerly
        loss_sum += loss.item() * labels.numel()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
        if progress is not None:
            progress(loss_sum / seen, 100 * correct / seen)
    return {"train_loss": loss_sum / max(seen, 1), "train_top1": 100 * correct / max(seen, 1)}


def evaluate(model: nn.Module | Callable, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Test loss, top-1 and top-5 (percent) over ``loader``, in eval mode."""
    if isinstance(model, nn.Module):
        model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            top1, top5 = topk_correct(logits, labels)
            correct1 += top1.sum().item()
            correct5 += top5.sum().item()
            total += labels.numel()
    return {"test_loss": loss_sum / total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
