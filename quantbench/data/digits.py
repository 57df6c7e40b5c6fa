"""scikit-learn's bundled 8x8 digits: always available, never downloads (the default for smoke runs and CI)."""


from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .memory import TensorSplit
from .registry import DatasetBundle, register_dataset, DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION


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

    train, test = to_dataset(train_images, train_labels), to_dataset(test_images, test_labels)
    return DatasetBundle(
        name="digits",
        train=train,
        test=test,
        num_classes=10,
        in_channels=1,
        image_size=8,
        train_tensors=TensorSplit(*train.tensors),  # already standardized floats, no augmentation
        test_tensors=TensorSplit(*test.tensors),
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}; stratified 80/20 split, seed 0)",
    )
