"""ImageNet as an ``ImageFolder`` tree: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``."""


from __future__ import annotations

from pathlib import Path

from torchvision import datasets as tv_datasets
from torchvision import transforms

from quantbench.errors import QuantbenchError
from .registry import DatasetNotFoundError, DatasetBundle, register_dataset, _one_line, IMAGENET_MEAN, IMAGENET_STD


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
