"""Data-parallel training across processes, as launched by ``torchrun`` (``torch.distributed.run``).

What quantbench synchronizes, and why:

* **The batch order.** ``EpochSampler`` splits the single-process order across ranks so that global batch ``b`` of a
  G-process run holds exactly the images of batch ``b`` of the 1-process run; ``batch_size`` is the global batch
  (each rank takes ``batch_size / G`` contiguous images of it), so the recipe's LR means the same at any G.
* **Quantizer state, by construction.** Every quantizer initializes from the first global batch, before DDP wraps the
  model, on every rank (each rank can read the whole batch), so data-driven init never depends on a rank's shard;
  rank 0's parameters and buffers are then broadcast to all ranks, so they are bit-identical whatever the
  reductions did. This is done through the model, not per class, so a plugin quantizer gets it too. DDP wraps with
  ``broadcast_buffers=False``: nothing overwrites a quantizer's buffers (its ``initialized`` flag) after that.
* **BatchNorm** (``--sync-bn``): statistics over the global batch, so a G-process run normalizes like the 1-process
  one. torch's ``SyncBatchNorm`` runs only on GPUs; on CPU (gloo) :class:`GlobalBatchNorm` does the same with two
  differentiable all-reduces.
* **Files** are written by rank 0 only; evaluation runs on rank 0 alone, on the full test set, exactly once.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

import quantizers
from quantbench.errors import QuantbenchError


@dataclass(frozen=True)
class Context:
    """Who this process is in a data-parallel job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launched_context() -> Context:
    """The torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Context(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def start(context: Context, device: torch.device) -> bool:
    """Join the process group (nccl on CUDA, gloo on CPU) in a multi-process job; True when this call created it
    (a caller that set up its own process group keeps it)."""
    if not context.is_distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, context: Context) -> torch.device:
    """``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``) in a multi-process job."""
    if device.type == "cuda" and device.index is None and context.is_distributed:
        return torch.device("cuda", context.local_rank)
    return device


def barrier(context: Context) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.barrier()


def from_main(value: Any, context: Context) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the final metrics, which rank 0 alone computes)."""
    if not context.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def per_rank_batch(batch_size: int, context: Context) -> int:
    if batch_size % context.world_size:
        raise QuantbenchError(f"--batch-size {batch_size} is the global batch and must divide evenly over "
                              f"{context.world_size} processes; choose a multiple of {context.world_size}")
    return batch_size // context.world_size


# ---- the batch order ----------------------------------------------------------------------------------------------


def epoch_order(count: int, seed: int) -> list[int]:
    """The order ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` visits ``count`` items in.

    The loader's iterator first draws its workers' base seed from the generator, then the sampler draws the
    permutation; a test checks this against a real DataLoader on the installed torch.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(count, generator=generator).tolist()


class EpochSampler(DistributedSampler):
    """The single-process epoch order, each global batch split across ranks in contiguous slices.

    ``set_epoch(epoch)`` picks the epoch; the order depends only on (seed, epoch), so a resumed run, every quantizer
    of a comparison and every world size see the same global batches.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, context: Context) -> None:
        super().__init__(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.global_batch = batch_size
        self.rank_batch = per_rank_batch(batch_size, context)
        self.batches = len(dataset) // batch_size

    def __iter__(self):
        order = epoch_order(len(self.dataset), self.seed * 100_003 + self.epoch)
        for batch in range(self.batches):
            start = batch * self.global_batch + self.rank * self.rank_batch
            yield from order[start:start + self.rank_batch]

    def __len__(self) -> int:
        return self.batches * self.rank_batch


def first_global_batch(dataset: Any, batch_size: int, seed: int, epoch: int) -> Tensor:
    """The images of global batch 0 of ``epoch``, as the 1-process run sees them. Augmentation draws from a forked
    RNG, so the training loop then draws exactly what it would have drawn."""
    indices = epoch_order(len(dataset), seed * 100_003 + epoch)[:batch_size]
    with torch.random.fork_rng(devices=[]):
        return torch.stack([dataset[index][0] for index in indices])


def train_loader(dataset: Any, batch_size: int, seed: int, context: Context, workers: int,
                 pin_memory: bool) -> DataLoader:
    """One loader for the whole run (call ``loader.sampler.set_epoch(epoch)`` each epoch)."""
    sampler = EpochSampler(dataset, batch_size, seed, context)
    # The generator only seeds worker processes; drawing it keeps the global RNG untouched by data loading.
    return DataLoader(dataset, batch_size=sampler.rank_batch, sampler=sampler, drop_last=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
                      persistent_workers=workers > 0)


# ---- quantizer state --------------------------------------------------------------------------------------------


def quantizers_of(model: nn.Module) -> list[quantizers.Quantizer]:
    return [module for module in model.modules() if isinstance(module, quantizers.Quantizer)]


def initialize_quantizers(model: nn.Module, images: Tensor) -> None:
    """Initialize every quantizer from ``images`` with one train-mode forward that leaves BatchNorm statistics as
    they were (the forward the first training step would have run, so a 1-process run is unchanged)."""
    pending = [q for q in quantizers_of(model) if not q._is_initialized]
    if not pending:
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{name: buffer.clone() for name, buffer in m.named_buffers(recurse=False)} for m in norms]
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(images)
    model.train(was_training)
    for module, buffers in zip(norms, saved):
        for name, value in buffers.items():
            getattr(module, name).copy_(value)


def broadcast_state(model: nn.Module, context: Context) -> None:
    """Rank 0's parameters and buffers on every rank (quantizers included), bit for bit."""
    if not context.is_distributed:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    for quantizer in quantizers_of(model):
        quantizer._is_initialized = bool(quantizer.initialized)


def ranks_agree(model: nn.Module, context: Context) -> bool:
    """Whether every quantizer's state (its ``state_dict``: parameters and persistent buffers) is bit-identical on
    every rank (all-gathered and compared). Non-persistent buffers are forward-side caches (e.g. the scale of the
    latest forward, which rank 0's evaluation refreshes), not state."""
    if not context.is_distributed:
        return True
    tensors = [t.detach().reshape(-1).double() for q in quantizers_of(model) for t in q.state_dict().values()
               if isinstance(t, Tensor)]
    if not tensors:
        return True
    state = torch.cat(tensors)
    gathered = [torch.empty_like(state) for _ in range(context.world_size)]
    dist.all_gather(gathered, state)
    return all(torch.equal(other, gathered[0]) for other in gathered[1:])


def wrap(model: nn.Module, context: Context, device: torch.device) -> nn.Module:
    """The module the training loop calls: ``model`` itself, or its DDP wrapper in a multi-process job."""
    if not context.is_distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():
        # torch >= 2.15 renames the flag but says to keep broadcast_buffers=False for buffers that must never be
        # overwritten; torch 2.14 knows only this name.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


# ---- BatchNorm across ranks --------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (each rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every rank's batch, for CPU process groups (torch's SyncBatchNorm is GPU-only).

    Two differentiable all-reduces (the mean, then the centred second moment) give the global batch's statistics
    the way one process computes them, and their backward all-reduces the gradients the same way.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        count = torch.tensor(float(input.numel() // input.shape[1]), device=input.device)
        count = _AllReduceSum.apply(count)
        mean = _AllReduceSum.apply(input.sum(dims)) / count
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased, momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm computes its statistics over the global batch (``--sync-bn``)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
