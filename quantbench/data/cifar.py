"""CIFAR-10 / CIFAR-100 in torchvision's python-pickle layout under ``data_dir``."""


from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

from typing import Any

import numpy as np
import torch
from torchvision import datasets as tv_datasets
from torchvision import transforms

from .memory import TensorSplit
from .registry import DatasetNotFoundError, DatasetBundle, register_dataset, _one_line, DEFAULT_DATA_ROOT, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD


def _build_cifar(
    name: str,
    dataset_class: type[tv_datasets.CIFAR10],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    data_dir: Path | None,
    download: bool,
    train_augment: bool,
) -> DatasetBundle:
    """Shared by CIFAR-10 and CIFAR-100: they differ only in the torchvision class, class count and statistics."""
    root = data_dir if data_dir is not None else DEFAULT_DATA_ROOT
    if root.name == dataset_class.base_folder:  # the user pointed at the batches folder itself
        root = root.parent
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train_augment else []
    try:
        train_transform = transforms.Compose(augment + normalize)
        train = dataset_class(str(root), train=True, transform=train_transform, download=download)
        test = dataset_class(str(root), train=False, transform=transforms.Compose(normalize), download=False)
    except (RuntimeError, URLError, OSError) as error:
        if not download and not isinstance(error, RuntimeError):
            raise  # e.g. a permission error reading files that are there: not a "not found"
        # torchvision says "Dataset not found or corrupted" (missing files or md5 mismatch); downloads fail with
        # URLError / OSError. Both mean the same to the user: the data is not usable where we looked.
        attempted = f" (download failed: {_one_line(error)})" if download else ""
        raise DatasetNotFoundError(
            f"{name}: no intact {dataset_class.base_folder}/ (missing or md5 mismatch) in {root}{attempted}; "
            f"pass --data-dir to the folder that contains {dataset_class.base_folder}/, or add --download when online"
        ) from error
    return DatasetBundle(
        name=name,
        train=train,
        test=test,
        num_classes=num_classes,
        in_channels=3,
        image_size=32,
        source=str(root / dataset_class.base_folder),
        # the same pixels for the in-memory pipeline (HWC uint8 -> NCHW): crops and flips drawn per batch
        train_tensors=TensorSplit(_nchw(train.data), _labels(train.targets), mean, std, flip=train_augment,
                                  crop_padding=4 if train_augment else 0),
        test_tensors=TensorSplit(_nchw(test.data), _labels(test.targets), mean, std),
    )


def _nchw(images: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _labels(targets: Any) -> torch.Tensor:
    return torch.as_tensor(targets, dtype=torch.int64)


@register_dataset("cifar10")
def build_cifar10(data_dir: Path | None = None, download: bool = False, train_augment: bool = True) -> DatasetBundle:
    """CIFAR-10 (32x32 colour, 10 classes, 50k/10k), torchvision's python batches under data_dir.

    Training augmentation is the standard random 32x32 crop of a 4-pixel zero-padded image plus horizontal flip.
    """
    return _build_cifar(
        "cifar10", tv_datasets.CIFAR10, 10, CIFAR10_MEAN, CIFAR10_STD, data_dir, download, train_augment
    )


@register_dataset("cifar100")
def build_cifar100(data_dir: Path | None = None, download: bool = False, train_augment: bool = True) -> DatasetBundle:
    """CIFAR-100 (32x32 colour, 100 fine classes, 50k/10k), torchvision's python files under data_dir.

    Training augmentation is the standard random 32x32 crop of a 4-pixel zero-padded image plus horizontal flip.
    """
    return _build_cifar(
        "cifar100", tv_datasets.CIFAR100, 100, CIFAR100_MEAN, CIFAR100_STD, data_dir, download, train_augment
    )
