"""The in-memory pipeline (quantbench.data.memory): the DataLoader path's order and pixels, batched augmentation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from quantbench.config import TrainConfig
from quantbench.data import create_dataset
from quantbench.data.memory import EvalBatches, MemoryLoader, TensorSplit, augment, pipeline_for
from quantbench.errors import QuantbenchError
from quantbench.training.distributed import Context
from quantbench.training.loop import data_loaders, epoch_loader


def pixels(count: int = 40, channels: int = 3, size: int = 6, seed: int = 0) -> TensorSplit:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, size, size), generator=generator, dtype=torch.uint8)
    return TensorSplit(images, torch.arange(count), (0.5, 0.4, 0.3)[:channels], (0.2, 0.3, 0.25)[:channels])


def test_normalization_is_totensor_then_normalize_bit_for_bit() -> None:
    split = pixels()
    ours, labels = split.batch(torch.arange(len(split)))
    reference = torch.stack([transforms.Normalize(split.mean, split.std)(transforms.ToTensor()(
        image.permute(1, 2, 0).numpy())) for image in split.images])
    assert torch.equal(ours, reference) and torch.equal(labels, torch.arange(len(split)))


def test_crops_and_flips_are_torchvisions_for_the_drawn_offsets() -> None:
    split = pixels()
    offsets = torch.tensor([[0, 8], [4, 4], [8, 0], [2, 7]])
    flips = torch.tensor([False, True, True, False])
    images = split.images[:4]
    ours = augment(images, {"offsets": offsets, "flip": flips}, padding=4)
    for image, (top, left), flip, out in zip(images, offsets.tolist(), flips, ours):
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))  # RandomCrop(padding=4): zeros around the image
        expected = padded[:, top:top + image.shape[1], left:left + image.shape[2]]
        assert torch.equal(out, expected.flip(-1) if flip else expected)


def test_epochs_follow_the_dataloader_order_and_ranks_take_their_slices() -> None:
    split = TensorSplit(torch.arange(50, dtype=torch.float32).reshape(50, 1, 1, 1), torch.arange(50))
    loader = MemoryLoader(split, batch_size=8, seed=3)
    loader.sampler.set_epoch(2)
    single = [labels for _, labels in loader]
    assert len(single) == len(loader) == 6
    reference = DataLoader(torch.utils.data.TensorDataset(split.images, split.labels), batch_size=8, shuffle=True,
                           drop_last=True, generator=torch.Generator().manual_seed(3 * 100_003 + 2))
    assert all(torch.equal(a, b) for a, (_, b) in zip(single, reference))  # the DataLoader path's order
    halves = []
    for rank in (0, 1):
        shard = MemoryLoader(split, batch_size=8, seed=3, rank=rank, world_size=2)
        shard.set_epoch(2)
        halves.append([labels for _, labels in shard])
    assert all(torch.equal(torch.cat([a, b]), whole) for a, b, whole in zip(*halves, single))


def test_augmentation_is_reproducible_and_the_same_on_every_world_size() -> None:
    split = pixels(count=64, channels=1, size=5)
    split = TensorSplit(split.images, split.labels, split.mean, split.std, flip=True, crop_padding=2)
    one = MemoryLoader(split, batch_size=16, seed=7)
    again = MemoryLoader(split, batch_size=16, seed=7)
    first = [images for images, _ in one]
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, again))
    shards = [MemoryLoader(split, batch_size=16, seed=7, rank=r, world_size=4) for r in range(4)]
    joined = [torch.cat(parts) for parts in zip(*[[images for images, _ in s] for s in shards])]
    assert all(torch.equal(a, b) for a, b in zip(first, joined))
    assert torch.equal(one.global_batch(epoch=0), first[0])
    one.set_epoch(1)
    assert not torch.equal(next(iter(one))[0], first[0])  # another epoch: other images and draws
    plain = TensorSplit(split.images, split.labels, split.mean, split.std)
    assert not all(torch.equal(a, b) for a, (b, _) in zip(first, MemoryLoader(plain, 16, 7)))  # it augments


def test_fashion_mnist_test_batches_equal_the_dataloaders() -> None:
    try:
        data = create_dataset("fashion-mnist")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    ours = next(iter(EvalBatches(data.test_tensors, 256)))
    reference = next(iter(DataLoader(data.test, batch_size=256)))
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    assert data.train_tensors.flip and not data.test_tensors.augmented


def test_digits_memory_and_loader_pipelines_give_the_same_batches() -> None:
    data = create_dataset("digits")
    config = TrainConfig(dataset="digits", batch_size=64, seed=1)
    memory = epoch_loader(data, config, epoch=1)
    loader = epoch_loader(data, TrainConfig(dataset="digits", batch_size=64, seed=1, data_pipeline="loader"), epoch=1)
    assert isinstance(memory, MemoryLoader) and not isinstance(loader, MemoryLoader)
    for (a, la), (b, lb) in zip(memory, loader):
        assert torch.equal(a, b) and torch.equal(la, lb)
    _, test = data_loaders(data, config, Context(), torch.device("cpu"))
    assert sum(len(labels) for _, labels in test) == len(data.test)


def test_pipeline_choice_and_bad_input() -> None:
    data = create_dataset("digits")
    assert pipeline_for(data, "auto") == "memory" and pipeline_for(data, "loader") == "loader"
    bare = type("Bundle", (), {"name": "imagenet", "train_tensors": None, "test_tensors": None})()
    assert pipeline_for(bare, "auto") == "loader"
    with pytest.raises(QuantbenchError, match="--data-pipeline loader"):
        pipeline_for(bare, "memory")
    with pytest.raises(QuantbenchError, match="--data-pipeline must be one of"):
        TrainConfig(data_pipeline="gpu")
    with pytest.raises(ValueError, match="N labels"):
        TensorSplit(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
