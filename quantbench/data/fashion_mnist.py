"""Fashion-MNIST from gzipped IDX files: ``data_dir``, the Debian package ``dataset-fashion-mnist``, or the download cache."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
from torchvision import datasets as tv_datasets
from torchvision import transforms

from quantbench.errors import QuantbenchError
from .memory import TensorSplit
from .registry import DatasetNotFoundError, DatasetBundle, register_dataset, _one_line, DEFAULT_DATA_ROOT, FASHION_MNIST_MEAN, FASHION_MNIST_STD

#: Installed by the Debian package ``dataset-fashion-mnist`` (gzipped IDX files, read-only).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

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
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as error:  # a truncated or not-gzip file: name it, not gzip's traceback
        raise QuantbenchError(f"{path}: cannot be read ({type(error).__name__}: {error}); replace the file "
                              "(e.g. reinstall dataset-fashion-mnist or download it again)") from None
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

    Lookup: ``data_dir`` alone when given (files directly in it or torchvision's ``FashionMNIST/raw`` layout;
    missing or corrupt files there are an error naming them), else the Debian package folder, then the download
    cache; only then, with ``download=True``, torchvision's downloader (into
    ``data_dir`` or the cache). Training augmentation is a random horizontal flip only: it is cheap, label
    preserving for clothing, and costs nothing measurable in two-epoch CPU runs (heavier augmentation slows them).
    """
    # an explicit data_dir is the only place looked in: a typo must not silently train on another copy
    places = [data_dir] if data_dir is not None else [DEBIAN_FASHION_MNIST_DIR, DEFAULT_DATA_ROOT]

    raw_dir = next((found for found in map(_fashion_mnist_dir, places) if found is not None), None)
    download_error = ""
    if raw_dir is None and download:
        target = data_dir if data_dir is not None else DEFAULT_DATA_ROOT
        try:
            tv_datasets.FashionMNIST(root=str(target), train=True, download=True)
            raw_dir = _fashion_mnist_dir(target)
        except (RuntimeError, URLError, OSError) as error:
            download_error = f"; download into {target} failed ({_one_line(error)})"
    if raw_dir is None and data_dir is not None:
        missing = [f"{stem}(.gz)" for stem in FASHION_MNIST_FILES.values() if _find_idx_file(Path(data_dir), stem) is None]
        state = "does not exist" if not Path(data_dir).is_dir() else f"lacks {', '.join(missing)}"
        raise DatasetNotFoundError(
            f"fashion-mnist: --data-dir {data_dir} {state}{download_error}; point --data-dir at the folder with the "
            "four *-ubyte(.gz) files, or leave it out to use the Debian package dataset-fashion-mnist (or add --download "
            "when online)"
        )
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
    train = IdxFashionMNIST(raw_dir, train=True, transform=train_transform)
    test = IdxFashionMNIST(raw_dir, train=False, transform=transforms.Compose(normalize))
    return DatasetBundle(
        name="fashion-mnist",
        train=train,
        test=test,
        num_classes=10,
        in_channels=1,
        image_size=28,
        source=source,
        # the same pixels for the in-memory pipeline: flips drawn per batch, ToTensor/Normalize's arithmetic
        train_tensors=TensorSplit(train.data.unsqueeze(1), train.targets, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                                  flip=train_augment),
        test_tensors=TensorSplit(test.data.unsqueeze(1), test.targets, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    )
