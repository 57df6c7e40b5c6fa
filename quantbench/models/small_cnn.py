"""``small_cnn``: a three-conv network for fast CPU runs (digits, Fashion-MNIST) and CI.

Layout: [conv3x3-BN-ReLU-maxpool] x2, conv3x3-BN-ReLU, adaptive average pool to 2x2, linear; channels
``width``, ``2*width``, ``4*width``. It is sized so that a full-precision Fashion-MNIST epoch (60k images, batch 128)
takes well under a minute on two CPU cores while still reaching about 89% test accuracy in two epochs, which makes
quantizer comparisons cheap enough to run on a laptop. Pooling to a fixed 2x2 grid keeps the coarse layout of the
image (top vs bottom matters for clothing: about one point of accuracy over global pooling) and makes the net
input-size agnostic (8x8 digits upwards). Like the other families it uses only ``nn.Conv2d`` / ``nn.Linear``
layers and one ``nn.ReLU`` module per activation, so quantized layers can be swapped in by walking the module tree.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from quantbench.errors import QuantbenchError

from ._registry import load_pretrained_for_own_family, register_model


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No conv bias: the following BatchNorm has its own shift.
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (two followed by 2x2 max-pool), 2x2 average pool and a linear classifier."""

    #: side of the grid the last feature map is average-pooled to before the classifier
    pooled_size = 2

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise QuantbenchError(f"width must be a positive integer, got {width}")
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(self.pooled_size)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width * self.pooled_size**2, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


@register_model("small_cnn")
def small_cnn(
    num_classes: int = 10, in_channels: int = 3, pretrained: bool | str | Path = False, width: int = 32
) -> SmallCNN:
    """Small 3-conv CNN (32/64/128 channels, ~98k params): seconds per Fashion-MNIST epoch on a CPU."""
    model = SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)
    return load_pretrained_for_own_family(model, pretrained, "small_cnn")
