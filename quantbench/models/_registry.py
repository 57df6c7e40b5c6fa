"""Name -> model builder registry, the ``create_model`` factory and local-weights loading shared by all families.

Kept apart from ``quantbench/models/__init__.py`` so that family modules can import ``register_model`` without a
circular import; ``__init__`` imports the families, which registers them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.utils.registry import Registry

ModelBuilder = Callable[..., nn.Module]


class PretrainedWeightsError(QuantbenchError):
    """Pretrained weights could not be obtained or do not fit the model; the message is one line naming the fix."""


_REGISTRY: Registry[ModelBuilder] = Registry("model", canonical=lambda name: name.strip().lower().replace("-", "_"))


register_model = _REGISTRY.register
available_models = _REGISTRY.names
model_info = _REGISTRY.info


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    pretrained: bool | str | Path = False,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and ``in_channels``-channel images.

    ``pretrained=True`` loads the family's published weights (torchvision models only; may download),
    ``pretrained="path/to/weights.pth"`` loads a local ``state_dict`` file. Extra ``kwargs`` go to the builder
    (e.g. ``width=`` for ``small_cnn``).
    """
    builder = _REGISTRY.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise QuantbenchError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise QuantbenchError(f"in_channels must be a positive integer, got {in_channels!r}")
    _REGISTRY.check_keywords(name, kwargs, common={"num_classes", "in_channels", "pretrained"})
    return builder(num_classes=num_classes, in_channels=in_channels, pretrained=pretrained, **kwargs)


def read_state_dict(path: str | Path, model_name: str) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` saved with ``torch.save``, also from a training checkpoint that wraps one.

    Accepts a bare ``state_dict``, or a dict holding it under ``"state_dict"`` or ``"model"`` (common checkpoint
    layouts), and drops a ``"module."`` prefix left by ``DataParallel``. Loads with ``weights_only=True`` so a
    weights file cannot run code.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise PretrainedWeightsError(f"{model_name}: no weights file at {file}; pass pretrained=<path to a .pth file>")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip or torch errors: all mean "not a readable weights file"
        message = " ".join(str(error).split())[:200]
        raise PretrainedWeightsError(
            f"{model_name}: could not read {file} as a torch state_dict ({type(error).__name__}: {message})"
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise PretrainedWeightsError(f"{model_name}: {file} holds no state_dict (a mapping of names to tensors)")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` cannot be loaded strictly into ``model``, in a few words; ``None`` when it can."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        return f"{len(missing)} missing keys (first: {missing[0]})"
    if unexpected:
        return f"{len(unexpected)} unexpected keys (first: {unexpected[0]})"
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            return f"{key} has shape {tuple(state_dict[key].shape)} in the file but {tuple(tensor.shape)} in the model"
    return None


def load_weights_file(model: nn.Module, path: str | Path, model_name: str) -> nn.Module:
    """Load a local ``state_dict`` file into ``model`` strictly; a mismatch fails with one line naming it."""
    state_dict = read_state_dict(path, model_name)
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch is not None:
        raise PretrainedWeightsError(
            f"{model_name}: weights in {path} do not fit this model ({mismatch}); "
            "check the model name, num_classes and in_channels they were saved with"
        )
    model.load_state_dict(state_dict)
    return model


def load_pretrained_for_own_family(model: nn.Module, pretrained: bool | str | Path, model_name: str) -> nn.Module:
    """``pretrained`` handling for models defined in this package: no published weights, local files only."""
    if pretrained is False or pretrained is None:
        return model
    if pretrained is True:
        raise PretrainedWeightsError(
            f"{model_name}: no published pretrained weights; pass pretrained=<path to a .pth state_dict> instead"
        )
    return load_weights_file(model, pretrained, model_name)
