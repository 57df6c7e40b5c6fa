"""In-memory datasets with batched augmentation (``--data-pipeline memory``, the default where a dataset supports it).

Small datasets (digits, Fashion-MNIST, CIFAR-10/100) fit in memory: each split is one tensor on the training device
(uint8 pixels, or digits' standardized floats) plus its labels, and every training batch is gathered, augmented and
normalized with a few whole-batch tensor ops instead of a DataLoader calling per-image PIL transforms in Python
(about 45% of a Fashion-MNIST small_cnn epoch on 2 CPU cores; on a GPU per-image transforms cannot keep up at all).

What stays the same as the DataLoader path (``--data-pipeline loader``):

* the order: the global batches of an epoch are :func:`quantbench.training.distributed.epoch_order`'s, so every
  quantizer of a comparison, a resumed run and every world size see the same images in the same batches, and each
  DDP rank takes its contiguous slice of each global batch;
* the pixels: augmentation acts on the uint8 image as torchvision does (zero padding, then a crop; a horizontal
  flip), and normalization is ``ToTensor`` + ``Normalize``'s arithmetic (``x / 255``, ``- mean``, ``/ std``), so a
  test batch is bit for bit the DataLoader's.

What differs: the random draws. A CPU generator seeded from (seed, epoch) draws each *global* batch's flips and crop
offsets, and a rank takes the draws of its own slice: the same seed gives the same augmented batches on CPU, on GPU
and on every rank of any world size (the DataLoader path draws from the global RNG, per image, per process).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TensorSplit:
    """One split as tensors: ``images`` (N, C, H, W), uint8 pixels (normalized per batch with ``mean``/``std``) or
    floats used as they are; ``labels`` (N,) int64; the training augmentation to apply per batch."""

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    flip: bool = False  # random horizontal flip, probability 1/2 (torchvision's RandomHorizontalFlip)
    crop_padding: int = 0  # random crop of the original size from the image zero-padded by this much (RandomCrop)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or len(self.images) != len(self.labels):
            raise ValueError(f"TensorSplit needs images (N, C, H, W) and N labels, got {tuple(self.images.shape)} "
                             f"and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def augmented(self) -> bool:
        return self.flip or self.crop_padding > 0

    def to(self, device: torch.device | str) -> TensorSplit:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def without_augmentation(self) -> TensorSplit:
        return replace(self, flip=False, crop_padding=0)

    def draw(self, count: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random choices of ``count`` images (CPU tensors): flips and crop offsets."""
        draws: dict[str, Tensor] = {}
        if self.flip:
            draws["flip"] = torch.rand(count, generator=generator) < 0.5
        if self.crop_padding:
            draws["offsets"] = torch.randint(0, 2 * self.crop_padding + 1, (count, 2), generator=generator)
        return draws

    def batch(self, indices: Tensor, draws: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Images ``indices`` augmented with ``draws`` (one per index; none: as they are) and normalized; labels."""
        images = self.images.index_select(0, indices)
        if draws:
            images = augment(images, draws, self.crop_padding)
        return self.normalize(images), self.labels.index_select(0, indices)

    def normalize(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            return images
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
        return images.float().div(255).sub(mean).div(std)  # ToTensor, then Normalize: the same float32 ops


def augment(images: Tensor, draws: dict[str, Tensor], padding: int) -> Tensor:
    """Random crops (zero padding, as RandomCrop) and horizontal flips of a uint8 batch, whole-batch ops only."""
    if "offsets" in draws and padding:
        height, width = images.shape[-2:]
        padded = F.pad(images, (padding, padding, padding, padding))
        offsets = draws["offsets"].to(images.device)
        rows = (offsets[:, 0:1] + torch.arange(height, device=images.device)).reshape(-1, 1, height, 1)
        cols = (offsets[:, 1:2] + torch.arange(width, device=images.device)).reshape(-1, 1, 1, width)
        batch = torch.arange(len(images), device=images.device).reshape(-1, 1, 1, 1)
        channels = torch.arange(images.shape[1], device=images.device).reshape(1, -1, 1, 1)
        images = padded[batch, channels, rows, cols]
    if "flip" in draws:
        flip = draws["flip"].to(images.device).reshape(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    return images


class MemoryLoader:
    """The training batches of a :class:`TensorSplit`, a drop-in for the DataLoader of ``train_loader``: call
    ``loader.sampler.set_epoch(epoch)`` each epoch, then iterate (images, labels) on ``device``."""

    def __init__(self, split: TensorSplit, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        from quantbench.training.distributed import epoch_order  # the DataLoader path's order, shared

        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        self.split = split.to(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.rank_batch = batch_size // world_size
        self.epoch = 0
        self.sampler = self  # the DataLoader interface run.py uses: loader.sampler.set_epoch(epoch)
        self._order = epoch_order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split) // self.batch_size

    def _global_batches(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        order = torch.tensor(self._order(len(self.split), self.seed * 100_003 + self.epoch))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919)  # augmentation only
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start:start + self.batch_size]
            yield indices, self.split.draw(len(indices), generator) if self.split.augmented else {}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.split.images.device
        mine = slice(self.rank * self.rank_batch, (self.rank + 1) * self.rank_batch)
        for indices, draws in self._global_batches():
            yield self.split.batch(indices[mine].to(device), {key: value[mine] for key, value in draws.items()})

    def global_batch(self, epoch: int, index: int = 0) -> Tensor:
        """The images of global batch ``index`` of ``epoch`` as every rank's loop sees them together (quantizers
        initialize from batch 0 of epoch 0)."""
        previous, self.epoch = self.epoch, epoch
        try:
            for number, (indices, draws) in enumerate(self._global_batches()):
                if number == index:
                    return self.split.batch(indices.to(self.split.images.device), draws)[0]
        finally:
            self.epoch = previous
        raise IndexError(f"epoch {epoch} has {len(self)} batches, no batch {index}")


class EvalBatches:
    """A split in order, in batches, normalized, no augmentation: the test loader of the in-memory pipeline."""

    def __init__(self, split: TensorSplit, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.split, self.batch_size = split.without_augmentation().to(device), batch_size

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.split.images.device
        for start in range(0, len(self.split), self.batch_size):
            indices = torch.arange(start, min(start + self.batch_size, len(self.split)), device=device)
            yield self.split.batch(indices)


def pipeline_for(data: Any, requested: str) -> str:
    """``memory`` or ``loader`` for dataset bundle ``data`` under ``--data-pipeline requested`` (auto: memory where
    the dataset has tensors)."""
    has_tensors = getattr(data, "train_tensors", None) is not None and getattr(data, "test_tensors", None) is not None
    if requested == "loader" or (requested == "auto" and not has_tensors):
        return "loader"
    if not has_tensors:
        from quantbench.errors import QuantbenchError

        raise QuantbenchError(f"--data-pipeline memory: dataset '{data.name}' is not held in memory (digits, "
                              "fashion-mnist, cifar10 and cifar100 are); use --data-pipeline loader")
    return "memory"
