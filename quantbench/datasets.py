"""Dataset registry and the ``create_dataset`` factory (the dataset counterpart of timm's model registry).

Every dataset is a builder function registered with ``@register_dataset(name)``; ``create_dataset(name, ...)``
returns a :class:`DatasetBundle` with the train and test splits plus what a model and the run metadata need
(class count, channels, image size, where the data was found).

Built in:

* ``digits``: scikit-learn's bundled 8x8 digits. Always available, never downloads: the default for smoke runs
  and CI.
* ``fashion-mnist``: read from ``data_dir``, else from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), else from the download cache; downloaded only with ``download=True``.
* ``cifar10`` / ``cifar100``: torchvision's python-pickle layout under ``data_dir``.
* ``imagenet``: an ``ImageFolder`` tree ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.

Missing data raises :class:`DatasetNotFoundError` with one line that says where we looked and how to get the data;
other bad input (an unknown name, a corrupt file) raises :class:`quantbench.errors.QuantbenchError`, a
``ValueError``. The CLI prints either message as is.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from quantbench.errors import QuantbenchError
from quantbench.registry import Registry

#: Where ``download=True`` puts data when no ``data_dir`` is given, and where we look for earlier downloads.
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "quantbench" / "data"
#: Installed by the Debian package ``dataset-fashion-mnist`` (gzipped IDX files, read-only).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

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


DatasetBuilder = Callable[..., DatasetBundle]


_REGISTRY: Registry[DatasetBuilder] = Registry("dataset", canonical=lambda name: name.strip().lower().replace("_", "-"))


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Function decorator: make ``builder(data_dir=, download=, train_augment=)`` available as ``create_dataset(name)``.

    The first line of the builder's docstring is the one-line description shown by :func:`dataset_info`.
    """
    return _REGISTRY.register(name)


def available_datasets() -> list[str]:
    """Names of every registered dataset, sorted."""
    return _REGISTRY.names()


def dataset_info(name: str) -> str:
    """One-line description of dataset ``name`` (for ``quantbench list`` and run reports)."""
    return _REGISTRY.info(name)


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


# ---- digits -------------------------------------------------------------------------------------------------------


@register_dataset("digits")
def build_digits(data_dir: Path | None = None, download: bool = False, train_augment: bool = True) -> DatasetBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); offline, the CI default.

    The split is stratified 80/20 with a fixed seed, so every run and every machine sees the same test set.
    Pixels (0..16) are scaled to [0, 1] and standardized with the training split's mean and std. ``data_dir``,
    ``download`` and ``train_augment`` are accepted for a uniform interface and ignored: the data ships with
    scikit-learn and is too small for augmentation to mean much.
    """
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8), values 0..16 -> [0, 1]
    labels = digits.target.astype(np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    mean, std = float(train_images.mean()), float(train_images.std())

    def to_dataset(split_images: np.ndarray, split_labels: np.ndarray) -> TensorDataset:
        standardized = (torch.from_numpy(split_images) - mean) / std
        return TensorDataset(standardized.unsqueeze(1).contiguous(), torch.from_numpy(split_labels))

    return DatasetBundle(
        name="digits",
        train=to_dataset(train_images, train_labels),
        test=to_dataset(test_images, test_labels),
        num_classes=10,
        in_channels=1,
        image_size=8,
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}; stratified 80/20 split, seed 0)",
    )


# ---- Fashion-MNIST ------------------------------------------------------------------------------------------------

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


def read_idx(path: Path, expected_magic: int) -> torch.Tensor:
    """Read an unsigned-byte IDX file (MNIST format), gzipped or not, into a uint8 tensor.

    torchvision's own reader only opens uncompressed files, while the Debian package and the upstream mirrors ship
    ``.gz`` files; reading them directly saves a decompressed copy on disk.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        data = stream.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        kind = "image" if expected_magic == IDX_IMAGES_MAGIC else "label"
        raise QuantbenchError(f"{path}: IDX magic number {magic}, expected {expected_magic}; not an MNIST {kind} file")
    num_dims = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims)]
    header_size = 4 + 4 * num_dims
    values = np.frombuffer(data, dtype=np.uint8, offset=header_size)
    if values.size != int(np.prod(shape)):
        raise QuantbenchError(f"{path}: header says shape {shape} but the file has {values.size} values; corrupted")
    return torch.from_numpy(values.reshape(shape).copy())


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_dir(base: Path) -> Path | None:
    """The folder under ``base`` that holds all four Fashion-MNIST IDX files (plain or gzipped), if any.

    Accepts the files directly in ``base`` (the Debian layout, a manual download) and torchvision's own layout
    ``base/FashionMNIST/raw`` (what ``download=True`` produces).
    """
    for directory in (base, base / "FashionMNIST" / "raw", base / "fashion-mnist"):
        if all(_find_idx_file(directory, stem) is not None for stem in FASHION_MNIST_FILES.values()):
            return directory
    return None


class IdxFashionMNIST(tv_datasets.FashionMNIST):
    """torchvision's ``FashionMNIST`` reading the four IDX files from any folder, gzipped or not.

    Subclassed rather than reimplemented so items, ``classes`` and ``repr`` behave exactly like torchvision's;
    only where the files live (``raw_folder``) and how they are opened (``_load_data``) change, because stock
    torchvision wants uncompressed files under ``root/FashionMNIST/raw``, which a read-only Debian folder of ``.gz``
    files is not.
    """

    def __init__(self, raw_dir: Path, train: bool = True, transform: Callable | None = None) -> None:
        self._raw_dir = Path(raw_dir)
        super().__init__(root=str(self._raw_dir), train=train, transform=transform, download=False)

    @property
    def raw_folder(self) -> str:
        return str(self._raw_dir)

    def _check_exists(self) -> bool:
        return all(_find_idx_file(self._raw_dir, stem) is not None for stem in FASHION_MNIST_FILES.values())

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if self.train else "test"
        images = read_idx(_find_idx_file(self._raw_dir, FASHION_MNIST_FILES[f"{split}_images"]), IDX_IMAGES_MAGIC)
        labels = read_idx(_find_idx_file(self._raw_dir, FASHION_MNIST_FILES[f"{split}_labels"]), IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise QuantbenchError(f"{self._raw_dir}: {len(images)} {split} images but {len(labels)} labels")
        return images, labels.long()


@register_dataset("fashion-mnist")
def build_fashion_mnist(
    data_dir: Path | None = None, download: bool = False, train_augment: bool = True
) -> DatasetBundle:
    """Zalando's Fashion-MNIST (28x28 grey, 10 classes, 60k/10k) from data_dir, the Debian package or a download.

    Lookup order: ``data_dir`` (files directly in it or torchvision's ``FashionMNIST/raw`` layout), the Debian
    package folder, the download cache; only then, with ``download=True``, torchvision's downloader (into
    ``data_dir`` or the cache). Training augmentation is a random horizontal flip only: it is cheap, label
    preserving for clothing, and costs nothing measurable in two-epoch CPU runs (heavier augmentation slows them).
    """
    places = [data_dir] if data_dir is not None else []
    places += [DEBIAN_FASHION_MNIST_DIR]
    if data_dir is None:
        places.append(DEFAULT_DATA_ROOT)

    raw_dir = next((found for found in map(_fashion_mnist_dir, places) if found is not None), None)
    download_error = ""
    if raw_dir is None and download:
        target = data_dir if data_dir is not None else DEFAULT_DATA_ROOT
        try:
            tv_datasets.FashionMNIST(root=str(target), train=True, download=True)
            raw_dir = _fashion_mnist_dir(target)
        except (RuntimeError, URLError, OSError) as error:
            download_error = f"; download into {target} failed ({_one_line(error)})"
    if raw_dir is None:
        looked = " or ".join(str(place) for place in places)
        raise DatasetNotFoundError(
            f"fashion-mnist: no train/t10k IDX files in {looked}{download_error}; install the Debian package "
            "dataset-fashion-mnist, pass --data-dir to a folder with the four *-ubyte(.gz) files, "
            "or add --download when online"
        )

    normalize = [transforms.ToTensor(), transforms.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)]
    train_transform = transforms.Compose(([transforms.RandomHorizontalFlip()] if train_augment else []) + normalize)
    source = str(raw_dir)
    if raw_dir == DEBIAN_FASHION_MNIST_DIR:
        source += " (Debian package dataset-fashion-mnist)"
    return DatasetBundle(
        name="fashion-mnist",
        train=IdxFashionMNIST(raw_dir, train=True, transform=train_transform),
        test=IdxFashionMNIST(raw_dir, train=False, transform=transforms.Compose(normalize)),
        num_classes=10,
        in_channels=1,
        image_size=28,
        source=source,
    )


# ---- CIFAR --------------------------------------------------------------------------------------------------------


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
    )


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


# ---- ImageNet -----------------------------------------------------------------------------------------------------


@register_dataset("imagenet")
def build_imagenet(data_dir: Path | None = None, download: bool = False, train_augment: bool = True) -> DatasetBundle:
    """ImageNet (ILSVRC-2012) as ImageFolder trees data_dir/train and data_dir/val; never downloaded.

    Preprocessing follows the LSQ paper: training images are resized to 256 (short side), randomly cropped to
    224x224 and horizontally flipped; test images are resized to 256 and centre-cropped to 224x224. Both are
    normalized with the ImageNet mean and std. ``download`` is ignored: ImageNet needs a manual, licensed download.
    """
    how_to_get = (
        "download ILSVRC-2012 from image-net.org and arrange it as train/<class>/*.JPEG and val/<class>/*.JPEG "
        "(ImageNet cannot be downloaded automatically)"
    )
    if data_dir is None:
        raise DatasetNotFoundError(f"imagenet: no --data-dir given, pass one with train/ and val/ in it; {how_to_get}")
    missing = [split for split in ("train", "val") if not (data_dir / split).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"imagenet: {' and '.join(f'{split}/' for split in missing)} missing in {data_dir}; {how_to_get}"
        )

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train_augment:
        train_steps = [transforms.Resize(256), transforms.RandomCrop(224), transforms.RandomHorizontalFlip()]
    else:
        train_steps = [transforms.Resize(256), transforms.CenterCrop(224)]
    test_steps = [transforms.Resize(256), transforms.CenterCrop(224)]
    try:
        train = tv_datasets.ImageFolder(str(data_dir / "train"), transform=transforms.Compose(train_steps + normalize))
        test = tv_datasets.ImageFolder(str(data_dir / "val"), transform=transforms.Compose(test_steps + normalize))
    except FileNotFoundError as error:  # ImageFolder: no class folders, or a class folder without images
        raise DatasetNotFoundError(f"imagenet: {_one_line(error)}; {how_to_get}") from error
    if test.classes != train.classes:
        # ImageFolder numbers classes by sorted folder name per split, so differing folders would silently
        # give the same label index to different classes.
        only_train = sorted(set(train.classes) - set(test.classes))[:3]
        only_val = sorted(set(test.classes) - set(train.classes))[:3]
        raise QuantbenchError(
            f"imagenet: train/ has {len(train.classes)} class folders and val/ has {len(test.classes)}, and they "
            f"must match (only in train: {only_train}, only in val: {only_val}); arrange val/ by class like train/"
        )
    return DatasetBundle(
        name="imagenet",
        train=train,
        test=test,
        num_classes=len(train.classes),
        in_channels=3,
        image_size=224,
        source=str(data_dir),
    )
