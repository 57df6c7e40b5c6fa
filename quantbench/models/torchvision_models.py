"""torchvision's ``resnet18``, ``resnet34``, ``resnet50`` and ``vgg16_bn``, adapted to the dataset at hand.

These are the standard (post-activation) architectures, for comparing with published full-precision baselines and
for starting QAT from torchvision's ImageNet weights. Adaptation happens *after* loading weights, so pretrained
weights always load into the architecture they were trained for:

* ``in_channels != 3``: the first conv is replaced; with pretrained weights the new kernel is the RGB kernel
  averaged over colour and repeated (scaled by ``3 / in_channels``), so a grey image gives the response the
  pretrained net gives to the same grey image in RGB.
* ``num_classes != 1000``: the last linear layer is replaced by a freshly initialized one.

``pretrained=True`` uses torchvision's default weights (downloaded once into the torch hub cache);
``pretrained="file.pth"`` loads a local ``state_dict``, either of the original torchvision model or of one already
adapted to ``num_classes`` / ``in_channels`` (e.g. a checkpoint of an earlier run).

Note: torchvision's residual blocks call one ``relu`` module several times in ``forward``; quantizers that wrap
``nn.Conv2d`` / ``nn.Linear`` inputs are unaffected, but per-ReLU hooks see several calls per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from ._registry import PretrainedWeightsError, read_state_dict, register_model, state_dict_mismatch

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class _Layout:
    """Where the layers that depend on the data live in a torchvision architecture."""

    first_conv: str
    classifier: str


_LAYOUTS = {
    "resnet18": _Layout(first_conv="conv1", classifier="fc"),
    "resnet34": _Layout(first_conv="conv1", classifier="fc"),
    "resnet50": _Layout(first_conv="conv1", classifier="fc"),
    "vgg16_bn": _Layout(first_conv="features.0", classifier="classifier.6"),
}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, module)


def _adapt(model: nn.Module, layout: _Layout, num_classes: int, in_channels: int, keep_first_conv: bool) -> None:
    """Replace the first conv and the classifier when the data differ from ImageNet's 3 channels / 1000 classes."""
    conv = model.get_submodule(layout.first_conv)
    if in_channels != conv.in_channels:
        new_conv = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
        )
        if keep_first_conv:
            with torch.no_grad():
                grey_kernel = conv.weight.mean(dim=1, keepdim=True)
                new_conv.weight.copy_(grey_kernel.repeat(1, in_channels, 1, 1) * (conv.in_channels / in_channels))
                if conv.bias is not None:
                    new_conv.bias.copy_(conv.bias)
        _set_submodule(model, layout.first_conv, new_conv)
    classifier = model.get_submodule(layout.classifier)
    if num_classes != classifier.out_features:
        _set_submodule(model, layout.classifier, nn.Linear(classifier.in_features, num_classes))


def _build(
    arch: str, num_classes: int, in_channels: int, pretrained: bool | str | Path, **kwargs: Any
) -> nn.Module:
    layout = _LAYOUTS[arch]
    builder = getattr(torchvision.models, arch)
    if pretrained is True:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            model = builder(weights=weights, **kwargs)
        except (URLError, OSError, RuntimeError) as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise PretrainedWeightsError(
                f"{arch}: could not get torchvision weights {weights} ({reason}); fetch them once with network "
                f"access (cached in {torch.hub.get_dir()}/checkpoints) or pass pretrained=<path to a .pth state_dict>"
            ) from error
        _adapt(model, layout, num_classes, in_channels, keep_first_conv=True)
        return model

    model = builder(weights=None, num_classes=IMAGENET_CLASSES, **kwargs)
    if pretrained is False or pretrained is None:
        _adapt(model, layout, num_classes, in_channels, keep_first_conv=False)
        return model

    state_dict = read_state_dict(pretrained, arch)
    if state_dict_mismatch(model, state_dict) is None:  # weights of the original ImageNet architecture
        model.load_state_dict(state_dict)
        _adapt(model, layout, num_classes, in_channels, keep_first_conv=True)
        return model
    _adapt(model, layout, num_classes, in_channels, keep_first_conv=False)
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch is not None:  # neither the original nor the adapted architecture
        raise PretrainedWeightsError(
            f"{arch}: weights in {pretrained} fit neither torchvision's {arch} nor one with num_classes={num_classes}, "
            f"in_channels={in_channels} ({mismatch})"
        )
    model.load_state_dict(state_dict)
    return model


@register_model("resnet18")
def resnet18(
    num_classes: int = 10, in_channels: int = 3, pretrained: bool | str | Path = False, **kwargs: Any
) -> nn.Module:
    """torchvision ResNet-18 (post-activation, 11.7M params at 1000 classes); pretrained=True: ImageNet weights."""
    return _build("resnet18", num_classes, in_channels, pretrained, **kwargs)


@register_model("resnet34")
def resnet34(
    num_classes: int = 10, in_channels: int = 3, pretrained: bool | str | Path = False, **kwargs: Any
) -> nn.Module:
    """torchvision ResNet-34 (post-activation, 21.8M params at 1000 classes); pretrained=True: ImageNet weights."""
    return _build("resnet34", num_classes, in_channels, pretrained, **kwargs)


@register_model("resnet50")
def resnet50(
    num_classes: int = 10, in_channels: int = 3, pretrained: bool | str | Path = False, **kwargs: Any
) -> nn.Module:
    """torchvision ResNet-50 (post-activation bottlenecks, 25.6M params at 1000 classes); pretrained=True: ImageNet."""
    return _build("resnet50", num_classes, in_channels, pretrained, **kwargs)


@register_model("vgg16_bn")
def vgg16_bn(
    num_classes: int = 10, in_channels: int = 3, pretrained: bool | str | Path = False, **kwargs: Any
) -> nn.Module:
    """torchvision VGG-16 with BatchNorm (138M params at 1000 classes); pretrained=True: ImageNet weights."""
    return _build("vgg16_bn", num_classes, in_channels, pretrained, **kwargs)
