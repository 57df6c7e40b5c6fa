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
from quantbench.qat import quantizer_parameters
from quantbench.data.memory import EvalBatches, MemoryLoader, pipeline_for
from quantbench.training.distributed import Context, per_rank_batch, train_loader
from quantbench.training.quantizer_hooks import QuantizerHooks
from quantbench.utils.modules import topk_correct
from quantizers.kernels.dispatch import match_inductor_isa

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


def data_loaders(data: Any, config: TrainConfig, context: Context, device: torch.device) -> tuple[Any, Any]:
    """The training batches (``loader.sampler.set_epoch(epoch)``, then iterate; an order that depends only on (seed,
    epoch), so a resumed run, every quantizer of a comparison and every world size see the same global batches) and
    the test batches, through ``config.data_pipeline``: ``memory`` (:mod:`quantbench.data.memory`) or ``loader``."""
    pipeline = pipeline_for(data, config.data_pipeline)
    rank_batch = per_rank_batch(config.batch_size, context)  # a batch size the world size cannot split fails here
    if pipeline == "memory":
        return (MemoryLoader(data.train_tensors, rank_batch * context.world_size, config.seed, context.rank,
                             context.world_size, device),
                EvalBatches(data.test_tensors, 256, device))
    return (train_loader(data.train, config.batch_size, config.seed, context, config.workers, device.type == "cuda"),
            DataLoader(data.test, batch_size=256, shuffle=False, num_workers=config.workers,
                       pin_memory=device.type == "cuda"))


def epoch_loader(data: Any, config: TrainConfig, epoch: int, context: Context | None = None,
                 device: torch.device | str = "cpu") -> Any:
    """The training batches ``train`` sees in ``epoch`` (see :func:`data_loaders`)."""
    loader, _ = data_loaders(data, config, context or Context(), torch.device(device))
    loader.sampler.set_epoch(epoch)
    return loader


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
    """What one epoch needs: the model (and the module to call, e.g. its compiled or DDP form), optimizer, recipe,
    device, and mixed precision (``amp``: off, bf16 or fp16, already resolved; fp16 brings a gradient scaler)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device
    steps_per_epoch: int
    teacher: nn.Module | None = None
    forward: nn.Module | Callable | None = None  # what to call for logits; defaults to model
    amp: str = "off"
    scaler: torch.amp.GradScaler | None = None
    compiled: bool = False
    extra_loss: Callable[[int], Tensor] | None = None  # step -> a term added to the loss (oscillation dampening)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_one_epoch(trainer: Trainer, loader: DataLoader, epoch: int, on_step: StepCallback | None = None,
                    max_steps: int | None = None, progress: Callable[[int, float, float], None] | None = None,
                    progress_every: int = 10) -> dict[str, float]:
    """One epoch (or its first ``max_steps`` iterations); returns mean train loss and top-1 over the steps run (over
    every rank's batches in a multi-process job). Running sums stay on the device: the host reads them only for
    ``progress`` (every ``progress_every`` steps) and once at the end."""
    model, optimizer, config = trainer.model, trainer.optimizer, trainer.config
    forward = trainer.forward or model
    total_steps = trainer.steps_per_epoch * config.epochs
    steps = min(trainer.steps_per_epoch, max_steps or trainer.steps_per_epoch)
    autocast = torch.autocast(trainer.device.type, dtype=AMP_DTYPES.get(trainer.amp), enabled=trainer.amp != "off")
    hooks = QuantizerHooks(model, trainer.steps_per_epoch, config.epochs)  # quantizers' stage signal and step hook
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=trainer.device)  # loss * n, correct, n
    for index, (images, labels) in enumerate(loader):
        if index >= steps:
            break
        step = epoch * trainer.steps_per_epoch + index
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step, total_steps)
        hooks.before_step(step)
        images = images.to(trainer.device, non_blocking=True,
                           memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
        labels = labels.to(trainer.device, non_blocking=True)
        with autocast:
            logits = forward(images)
            loss = F.cross_entropy(logits.float(), labels)
            if trainer.teacher is not None:
                with torch.no_grad():
                    teacher_logits = trainer.teacher(images)
                kd = distillation_loss(logits.float(), teacher_logits.float(), config.distill_temperature)
                loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
        penalty = hooks.regularization()
        if penalty is not None:
            loss = loss + penalty.to(loss.device)
        if trainer.extra_loss is not None:
            loss = loss + trainer.extra_loss(step)
        optimizer.zero_grad(set_to_none=True)
        if trainer.scaler is not None:
            trainer.scaler.scale(loss).backward()
            trainer.scaler.unscale_(optimizer)  # the callback and the step see true gradients
        else:
            loss.backward()
        if on_step is not None:
            on_step(step, loss, logits, labels)
        if trainer.scaler is not None:
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
        else:
            optimizer.step()
        hooks.after_step(step)
        if config.compile and not trainer.compiled:
            match_inductor_isa()
            forward = trainer.forward = torch.compile(forward)  # after one eager step: quantizers initialize eagerly
            trainer.compiled = True
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * labels.numel(),
                                 (logits.argmax(1) == labels).sum().double(),
                                 torch.tensor(float(labels.numel()), dtype=torch.float64, device=sums.device)])
        if progress is not None and ((index + 1) % progress_every == 0 or index + 1 == steps):
            loss_sum, correct, seen = sums.tolist()
            progress(index + 1, loss_sum / seen, 100 * correct / seen)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss_sum, correct, seen = sums.tolist()
    return {"train_loss": loss_sum / max(seen, 1), "train_top1": 100 * correct / max(seen, 1)}


def evaluate(model: nn.Module | Callable, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Test loss, top-1 and top-5 (percent) over ``loader``, in eval mode (sums on the device, read once)."""
    if isinstance(model, nn.Module):
        model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images).float()
            top1, top5 = topk_correct(logits, labels)
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), top1.sum().double(),
                                 top5.sum().double(), torch.tensor(float(labels.numel()), dtype=torch.float64,
                                                                   device=device)])
    loss_sum, correct1, correct5, total = sums.tolist()
    return {"test_loss": loss_sum / total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
