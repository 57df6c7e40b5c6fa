"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks"), as used by LSQ.

Two layouts:

* CIFAR-style ``preact_resnet20/32/56``: a 3x3 stem conv, three stages of 16/32/64 channels with
  n = (depth - 2) / 6 basic blocks each, a final BN-ReLU, global average pooling and a linear classifier.
* ImageNet-style ``preact_resnet18/34`` (basic blocks) and ``preact_resnet50`` (bottlenecks): a 7x7 stride-2
  conv-BN-ReLU stem and 3x3 max-pool, four stages of 64/128/256/512 base channels, final BN-ReLU, pool, linear.
  As in the authors' Torch code (fb.resnet.torch ``preresnet.lua``) the very first block skips its own BN-ReLU,
  because the stem output is already activated.

A block computes BN-ReLU-conv-BN-ReLU-conv (bottleneck: three convs) plus a shortcut. When the shape changes the
shortcut is a 1x1 conv applied to the *pre-activated* input, as in the reference implementation; otherwise it is
the identity on the raw input.

Built for quantization-aware training: every activation is its own ``nn.ReLU`` module, every layer an
``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` module used exactly once, so a later pass can swap layers for
quantized ones by walking ``named_modules()``. Global average pooling lets every model run on inputs as small as
8x8 (digits) or 28x28 (Fashion-MNIST).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from ._registry import load_pretrained_for_own_family, register_model

StemStyle = Literal["cifar", "imagenet"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv with 'same' padding; no bias because a BatchNorm always follows."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 conv for bottlenecks and projection shortcuts."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class _PreActBlock(nn.Module):
    """What every pre-activation block shares: the BN-ReLU in front, the shortcut, and ``residual + shortcut``."""

    expansion: int

    def __init__(self, in_channels: int, preactivate: bool) -> None:
        super().__init__()
        # Skipped (identity) only right after an already activated stem.
        self.bn1 = nn.BatchNorm2d(in_channels) if preactivate else nn.Identity()
        self.relu1 = nn.ReLU() if preactivate else nn.Identity()

    def _add_shortcut(self, in_channels: int, out_channels: int, stride: int) -> None:
        # Registered after the block's convs, so modules (and their seeded initialization) keep their order.
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv1x1(in_channels, out_channels, stride) if needs_projection else None

    def residual(self, activated: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        shortcut = self.shortcut(activated) if self.shortcut is not None else x
        return self.residual(activated) + shortcut


class PreActBasicBlock(_PreActBlock):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut (two 3x3 convs; CIFAR nets and ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, preactivate: bool = True) -> None:
        super().__init__(in_channels, preactivate)
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(channels, channels * self.expansion)
        self._add_shortcut(in_channels, channels * self.expansion, stride)

    def residual(self, activated: Tensor) -> Tensor:
        return self.conv2(self.relu2(self.bn2(self.conv1(activated))))


class PreActBottleneck(_PreActBlock):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 plus shortcut (ResNet-50); stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, preactivate: bool = True) -> None:
        super().__init__(in_channels, preactivate)
        self.conv1 = conv1x1(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu3 = nn.ReLU()
        self.conv3 = conv1x1(channels, channels * self.expansion)
        self._add_shortcut(in_channels, channels * self.expansion, stride)

    def residual(self, activated: Tensor) -> Tensor:
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return self.conv3(self.relu3(self.bn3(out)))


Block = type[PreActBasicBlock] | type[PreActBottleneck]


class PreActResNet(nn.Module):
    """A pre-activation ResNet: stem, stages of residual blocks, final BN-ReLU, global average pool, linear.

    ``stem="cifar"``: one 3x3 conv at full resolution (the first block pre-activates its output).
    ``stem="imagenet"``: 7x7 stride-2 conv-BN-ReLU then 3x3 stride-2 max-pool. The first stage keeps resolution,
    each later stage halves it.
    """

    def __init__(
        self,
        block: Block,
        blocks_per_stage: list[int],
        stage_channels: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        stem: StemStyle = "cifar",
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(stage_channels):
            raise ValueError("blocks_per_stage and stage_channels must have the same length")
        if stem == "cifar":
            stem_channels = stage_channels[0]
            self.stem = nn.Sequential(conv3x3(in_channels, stem_channels))
            first_block_preactivates = True
        elif stem == "imagenet":
            stem_channels = 64
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
            first_block_preactivates = False
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")

        stages = []
        channels_in = stem_channels
        for stage_index, (num_blocks, channels) in enumerate(zip(blocks_per_stage, stage_channels)):
            blocks = []
            for block_index in range(num_blocks):
                is_first_block = stage_index == 0 and block_index == 0
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                preactivate = first_block_preactivates or not is_first_block
                blocks.append(block(channels_in, channels, stride=stride, preactivate=preactivate))
                channels_in = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        # Pre-activation blocks end on a bare conv sum, so the network activates once more before pooling.
        self.final_bn = nn.BatchNorm2d(channels_in)
        self.final_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialization for ReLU nets (as in the paper and torchvision); BN starts as the identity.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = self.final_relu(self.final_bn(self.stages(self.stem(x))))
        return self.fc(self.flatten(self.avgpool(features)))


# name -> (block, blocks per stage, channels per stage, stem, one-line description): the LSQ paper's CIFAR and ImageNet
# pre-activation ResNets (He et al. 2016b), each registered below as ``create_model(name)``.
_FAMILY: dict[str, tuple[Block, list[int], list[int], str, str]] = {
    "preact_resnet20": (PreActBasicBlock, [3, 3, 3], [16, 32, 64], "cifar",
                        "Pre-activation ResNet-20, CIFAR layout (3x3 basic blocks per stage, 16/32/64 channels, ~0.27M params)."),
    "preact_resnet32": (PreActBasicBlock, [5, 5, 5], [16, 32, 64], "cifar",
                        "Pre-activation ResNet-32, CIFAR layout (5x3 basic blocks per stage, 16/32/64 channels, ~0.46M params)."),
    "preact_resnet56": (PreActBasicBlock, [9, 9, 9], [16, 32, 64], "cifar",
                        "Pre-activation ResNet-56, CIFAR layout (9x3 basic blocks per stage, 16/32/64 channels, ~0.85M params)."),
    "preact_resnet18": (PreActBasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], "imagenet",
                        "Pre-activation ResNet-18, ImageNet layout (basic blocks 2-2-2-2, 7x7 stem + max-pool), as in LSQ."),
    "preact_resnet34": (PreActBasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], "imagenet",
                        "Pre-activation ResNet-34, ImageNet layout (basic blocks 3-4-6-3, 7x7 stem + max-pool), as in LSQ."),
    "preact_resnet50": (PreActBottleneck, [3, 4, 6, 3], [64, 128, 256, 512], "imagenet",
                        "Pre-activation ResNet-50, ImageNet layout (bottlenecks 3-4-6-3, 7x7 stem + max-pool), as in LSQ."),
}


def _family_builder(name: str) -> Callable[..., PreActResNet]:
    block, blocks_per_stage, channels, stem, description = _FAMILY[name]

    def build(num_classes: int = 10, in_channels: int = 3, pretrained: bool | str | Path = False) -> PreActResNet:
        model = PreActResNet(block, blocks_per_stage, channels, num_classes, in_channels, stem=stem)
        return load_pretrained_for_own_family(model, pretrained, name)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = description
    return build


for _name in _FAMILY:
    register_model(_name)(_family_builder(_name))
