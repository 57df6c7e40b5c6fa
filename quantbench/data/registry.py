"""The dataset registry, the ``DatasetBundle`` every builder returns, and ``create_dataset`` (see :mod:`quantbench.data`)."""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from quantbench.utils.registry import Registry

from .memory import TensorSplit


#: Where ``download=True`` puts data when no ``data_dir`` is given, and where we look for earlier downloads.
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "quantbench" / "data"

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: Seed of the fixed digits train/test split: the split is part of the benchmark definition, not a run option.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2



class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where we looked; the message is one line naming the places and the fix."""


@dataclass(frozen=True)
class DatasetBundle:
    """The two splits of a dataset and the facts a model builder and the run metadata need about them."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    #: side of the (square) images the model sees, after the test-time transform
    image_size: int
    #: where the data came from (a path, a package), recorded in run metadata for reproducibility
    source: str
    #: the splits as tensors for the in-memory pipeline (``quantbench.data.memory``); None: DataLoader only
    train_tensors: TensorSplit | None = None
    test_tensors: TensorSplit | None = None


DatasetBuilder = Callable[..., DatasetBundle]


_REGISTRY: Registry[DatasetBuilder] = Registry("dataset", canonical=lambda name: name.strip().lower().replace("_", "-"))


register_dataset = _REGISTRY.register
available_datasets = _REGISTRY.names
dataset_info = _REGISTRY.info


def create_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    train_augment: bool = True,
) -> DatasetBundle:
    """Build the train/test splits of dataset ``name``.

    ``data_dir`` is where to look first (each dataset documents its layout); ``download=True`` allows fetching the
    data when it is found nowhere (needs network access); ``train_augment=False`` gives the training split the
    test-time transform, e.g. for measuring training-set accuracy or for deterministic debugging.
    """
    builder = _REGISTRY.get(name)
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    return builder(data_dir=directory, download=download, train_augment=train_augment)


def _one_line(error: BaseException) -> str:
    """An exception as a single line, so wrapped errors keep the one-line message promise."""
    return " ".join(f"{type(error).__name__}: {error}".split())

