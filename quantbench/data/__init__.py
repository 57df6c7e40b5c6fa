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

from .registry import (
    DatasetBundle,
    DatasetNotFoundError,
    available_datasets,
    create_dataset,
    dataset_info,
    register_dataset,
)
from . import cifar, digits, fashion_mnist, imagenet  # noqa: E402,F401  (importing registers the datasets)

__all__ = ["DatasetBundle", "DatasetNotFoundError", "available_datasets", "create_dataset", "dataset_info",
           "register_dataset"]
