"""Tests of the dataset registry: each loader reads tiny files written in the real on-disk format.

Writing the real formats (CIFAR pickles, gzipped IDX, a JPEG ImageFolder tree) exercises the same torchvision code
paths as the full datasets without needing them, so these tests run offline in seconds.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import cifar as tv_cifar
from torchvision.datasets import utils as tv_utils

from quantbench import data as datasets
from tests.helpers import assert_one_line
from quantbench.data import fashion_mnist
from quantbench.data import DatasetNotFoundError, create_dataset
from quantbench.errors import QuantbenchError

# ---- helpers that write the real formats --------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file: big-endian magic (0x08 type, ndim), dims, then the bytes."""
    magic = (0x08 << 8) | array.ndim  # 2051 for 3-D images, 2049 for 1-D labels
    header = magic.to_bytes(4, "big") + b"".join(dim.to_bytes(4, "big") for dim in array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(directory: Path, num_train: int = 12, num_test: int = 5) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)


def write_cifar_batch(path: Path, count: int, label_key: str, first_label: int, num_classes: int) -> None:
    # The real files were pickled by Python 2, so torchvision's ``pickle.load(encoding="latin1")`` sees str keys;
    # str keys here give the same dict (bytes keys would not be decoded and torchvision would not find "data").
    rng = np.random.default_rng(first_label)
    batch = {
        "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
        label_key: [(first_label + i) % num_classes for i in range(count)],
    }
    with open(path, "wb") as stream:
        pickle.dump(batch, stream, protocol=2)


def write_cifar10(root: Path, per_batch: int = 2, num_test: int = 3) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for index in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{index}", per_batch, "labels", index, 10)
    write_cifar_batch(folder / "test_batch", num_test, "labels", 0, 10)
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, stream, protocol=2)


def write_cifar100(root: Path, num_train: int = 6, num_test: int = 4) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    write_cifar_batch(folder / "train", num_train, "fine_labels", 90, 100)
    write_cifar_batch(folder / "test", num_test, "fine_labels", 0, 100)
    with open(folder / "meta", "wb") as stream:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, stream, protocol=2)


def write_image_folder(split_dir: Path, classes: list[str], per_class: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(len(classes))
    for class_name in classes:
        (split_dir / class_name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(split_dir / class_name / f"{index}.JPEG", format="JPEG")


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torchvision's CIFAR loaders accept our tiny files.

    torchvision checks every CIFAR file against the md5 of the official release, which no synthetic file can match.
    Only the checksum is dropped: ``check_integrity(path, None)`` still requires each file to exist, so the
    missing-file behaviour under test is unchanged. Patched in ``torchvision.datasets.cifar`` (where the loaders
    look the name up) and for this test only.
    """
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: tv_utils.check_integrity(path, None))


# ---- registry ------------------------------------------------------------------------------------------------------


def test_registry_lists_every_builtin_dataset_with_a_description() -> None:
    names = datasets.available_datasets()
    assert names == sorted(names)
    assert {"digits", "fashion-mnist", "cifar10", "cifar100", "imagenet"} <= set(names)
    for name in names:
        description = datasets.dataset_info(name)
        assert description and "\n" not in description


def test_unknown_dataset_names_the_available_ones_in_one_line() -> None:
    # QuantbenchError is a ValueError that the CLI prints as one line (exit status 2)
    with pytest.raises(QuantbenchError) as caught:
        create_dataset("mnist-but-wrong")
    assert_one_line(caught.value, "mnist-but-wrong", "digits", "fashion-mnist", "cifar10", "imagenet")


def test_registering_a_taken_name_fails() -> None:
    with pytest.raises(ValueError, match="already taken"):
        datasets.register_dataset("digits")(lambda **_: None)


def test_dataset_not_found_error_is_a_file_not_found_error() -> None:
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


# ---- digits ----------------------------------------------------------------------------------------------------------


def test_digits_has_a_fixed_stratified_split_of_standardized_8x8_images() -> None:
    bundle = create_dataset("digits")
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 8)
    assert bundle.name == "digits" and "load_digits" in bundle.source
    image, label = bundle.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert isinstance(int(label), int) and 0 <= int(label) < 10
    train_images = bundle.train.tensors[0]
    assert abs(float(train_images.mean())) < 1e-4 and abs(float(train_images.std()) - 1) < 1e-3
    # stratified: every class in the test split, in roughly equal numbers
    test_counts = torch.bincount(bundle.test.tensors[1], minlength=10)
    assert int(test_counts.min()) >= 35
    again = create_dataset("digits")
    assert torch.equal(again.test.tensors[0], bundle.test.tensors[0])


# ---- Fashion-MNIST ---------------------------------------------------------------------------------------------------


def test_fashion_mnist_reads_gzipped_idx_files_from_data_dir(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, num_train=12, num_test=5)
    bundle = create_dataset("fashion-mnist", data_dir=tmp_path, train_augment=False)
    assert (len(bundle.train), len(bundle.test)) == (12, 5)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert bundle.source == str(tmp_path)
    image, label = bundle.train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == 3
    assert [bundle.test[i][1] for i in range(5)] == [0, 1, 2, 3, 4]


def test_fashion_mnist_reads_torchvision_layout_with_uncompressed_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(raw, num_train=7, num_test=2)
    for gz_file in raw.glob("*.gz"):  # what torchvision's download leaves: the extracted files
        gz_file.with_suffix("").write_bytes(gzip.decompress(gz_file.read_bytes()))
        gz_file.unlink()
    bundle = create_dataset("fashion-mnist", data_dir=tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (7, 2)
    assert bundle.train[0][0].shape == (1, 28, 28)


def test_fashion_mnist_missing_everywhere_raises_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Point the Debian location somewhere empty so the test does not depend on what is installed here.
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    with pytest.raises(DatasetNotFoundError) as caught:
        create_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    assert_one_line(caught.value, "fashion-mnist", str(tmp_path / "empty"), "dataset-fashion-mnist", "--download")


def test_an_explicit_data_dir_is_the_only_place_looked_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in --data-dir, or a folder lacking a file, is an error naming the folder (and the missing files), even
    where another copy (the Debian package here) exists."""
    debian = tmp_path / "debian"
    write_fashion_mnist(debian)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", debian)
    assert create_dataset("fashion-mnist").source.startswith(str(debian))  # no --data-dir: the Debian copy
    with pytest.raises(DatasetNotFoundError) as caught:
        create_dataset("fashion-mnist", data_dir=tmp_path / "nonexistent")
    assert_one_line(caught.value, str(tmp_path / "nonexistent"), "does not exist")
    partial = tmp_path / "partial"
    write_fashion_mnist(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as caught:
        create_dataset("fashion-mnist", data_dir=partial)
    assert_one_line(caught.value, str(partial), "lacks t10k-labels-idx1-ubyte(.gz)")
    corrupt = tmp_path / "corrupt"
    write_fashion_mnist(corrupt)
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(QuantbenchError) as caught:
        create_dataset("fashion-mnist", data_dir=corrupt)
    assert_one_line(caught.value, str(corrupt / "train-images-idx3-ubyte.gz"), "cannot be read")


def test_fashion_mnist_rejects_a_file_with_the_wrong_magic_number(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((12, 28, 28)))  # images where labels belong
    with pytest.raises(ValueError, match="magic number"):
        create_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.mark.skipif(
    not fashion_mnist.DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_loads_the_debian_package_files() -> None:
    bundle = create_dataset("fashion-mnist")
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert "Debian" in bundle.source
    image, label = bundle.test[0]
    assert image.shape == (1, 28, 28) and label == 9  # the first test image is an ankle boot
    assert torch.bincount(bundle.train.targets).tolist() == [6000] * 10


# ---- CIFAR -----------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar10_reads_python_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=2, num_test=3)
    bundle = create_dataset("cifar10", data_dir=tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (10, 3)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, 32)
    assert bundle.train.targets == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert bundle.test[0][0].shape == (3, 32, 32)


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar10_accepts_the_batches_folder_itself_as_data_dir(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bundle = create_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py")
    assert len(bundle.train) == 10


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path, num_train=6, num_test=4)
    bundle = create_dataset("cifar100", data_dir=tmp_path, train_augment=False)
    assert (len(bundle.train), len(bundle.test)) == (6, 4)
    assert bundle.num_classes == 100
    assert bundle.train.targets == [90, 91, 92, 93, 94, 95]
    assert bundle.test[2][0].shape == (3, 32, 32) and bundle.test[2][1] == 2


@pytest.mark.usefixtures("skip_cifar_md5")
@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_raises_one_line(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        create_dataset(name, data_dir=tmp_path)
    assert_one_line(caught.value, name, folder, str(tmp_path), "--data-dir", "--download")


def test_cifar_with_wrong_checksums_is_reported_as_not_found(tmp_path: Path) -> None:
    write_cifar10(tmp_path)  # synthetic files, and the md5 check is active here
    with pytest.raises(DatasetNotFoundError, match="md5"):
        create_dataset("cifar10", data_dir=tmp_path)


# ---- ImageNet --------------------------------------------------------------------------------------------------------


def test_imagenet_reads_an_image_folder_tree_with_paper_preprocessing(tmp_path: Path) -> None:
    classes = ["n01440764", "n01443537", "n01484850"]
    write_image_folder(tmp_path / "train", classes, per_class=2, size=(300, 260))
    write_image_folder(tmp_path / "val", classes, per_class=1, size=(260, 300))
    bundle = create_dataset("imagenet", data_dir=tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (6, 3)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, 224)
    image, label = bundle.train[5]
    assert image.shape == (3, 224, 224) and label == 2
    assert bundle.test[1][0].shape == (3, 224, 224) and bundle.test[1][1] == 1


def test_imagenet_missing_val_says_so(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=1, size=(32, 32))
    with pytest.raises(DatasetNotFoundError) as caught:
        create_dataset("imagenet", data_dir=tmp_path)
    assert_one_line(caught.value, "imagenet", "val/", str(tmp_path))
    assert "train/" not in str(caught.value).split(";")[0]


def test_imagenet_without_data_dir_raises_one_line() -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        create_dataset("imagenet")
    assert_one_line(caught.value, "imagenet", "--data-dir")


def test_imagenet_rejects_different_class_folders_in_train_and_val(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", ["a", "b", "c"], per_class=1, size=(32, 32))
    write_image_folder(tmp_path / "val", ["a", "c"], per_class=1, size=(32, 32))
    with pytest.raises(ValueError, match="must match"):
        create_dataset("imagenet", data_dir=tmp_path)
