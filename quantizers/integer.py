"""What a quantizer looks like on integers: ``IntegerSpec``, the contract behind export and integer inference.

A quantized layer runs on integers when each of its quantizers can say ``output = code * step`` with integer codes
(``Quantizer.integer_spec()``); activations also need the requantizer, float input -> code, written exactly as the
fake quantizer computes it so that the codes agree bit for bit (LSQ paper, Figure 1).

Weights may have one step per output channel (axis 0, the convention of every deployment toolkit): ``step`` is then
a list of floats, ``output[c] = code * step[c]``, and the codes share one ``[lo, hi]`` and ``stride``. Activations
keep one step (their requantizer divides by one ``width``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .errors import QuantizerError


@dataclass
class IntegerSpec:
    """A quantizer as integers: its output is ``code * step`` with integer ``code`` in ``[lo, hi]`` (every ``stride``-th).

    Activations also need the requantizer, float input -> code, written as the fake quantizer computes it:
    ``clamp(round(((x - offset) / width) * multiplier), lo, hi)`` (on ``|x|``, then times ``sign(x)``, when
    ``magnitude``). ``width`` is None for a quantizer that can only give weight codes.

    ``step`` is one float, or for weights with one step per output channel (axis 0) a list of floats, one per
    channel: ``output[c] = code * step[c]``. A per-channel spec has no activation requantizer (``width`` None).
    """

    step: float | list[float]
    lo: int
    hi: int
    stride: int = 1
    offset: float = 0.0
    width: float | None = None
    multiplier: float = 1.0
    magnitude: bool = False

    def __post_init__(self) -> None:
        # a plugin may give a tensor or a tuple: one step stays a float, several become a list of exact floats
        step = self.step
        if isinstance(step, Tensor):
            step = step.detach().double().cpu().reshape(-1).tolist() if step.dim() else float(step.detach())
        if isinstance(step, Sequence) and not isinstance(step, str):
            step = [float(value) for value in step]
            if not step:
                raise QuantizerError("IntegerSpec step is an empty list: give one step per output channel (axis 0)")
            if self.width is not None:
                raise QuantizerError("IntegerSpec with per-channel steps has an activation requantizer (width); "
                                     "activations take one step: give per-channel steps for weights only")
            bad = [value for value in step if not (math.isfinite(value) and value > 0)]
            if bad:  # the export divides by each channel's step
                raise QuantizerError(f"IntegerSpec per-channel steps must be positive and finite, got {bad[0]!r}")
        else:
            step = float(step)
        self.step = step

    @property
    def per_channel(self) -> bool:
        """One step per output channel (axis 0) rather than one for the tensor."""
        return isinstance(self.step, list)

    def steps(self, channels: int) -> Tensor:
        """The steps as a float64 tensor of ``channels`` values (one step repeated; per channel, checked to fit)."""
        if not self.per_channel:
            return torch.full((channels,), self.step, dtype=torch.float64)
        if len(self.step) != channels:
            raise QuantizerError(f"IntegerSpec has {len(self.step)} per-channel steps for a tensor of {channels} output "
                                 "channels (axis 0); give one step per output channel")
        return torch.tensor(self.step, dtype=torch.float64)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def exact_float(value: Tensor | float) -> float:
    """A 0-d tensor as a Python float holding its exact value (float32 values are exact in float64)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def exact_steps(value: Tensor) -> float | list[float]:
    """A step tensor as the spec's ``step``: a 0-d tensor as a float, a per-channel one as a list of exact floats."""
    value = value.detach()
    return float(value) if value.dim() == 0 else value.double().cpu().reshape(-1).tolist()


def spec_from_levels(levels: Tensor, name: str) -> IntegerSpec:
    """Weight codes of a quantizer whose ``levels()`` are a uniform grid through 0 or offset by half a step."""
    levels = levels.detach().double().flatten().sort().values.cpu()
    if levels.numel() < 2:
        raise QuantizerError(f"quantizer '{name}' has fewer than two levels: no integer grid")
    gaps = levels[1:] - levels[:-1]
    gap = float(gaps.mean())
    if not gap > 0 or float((gaps - gap).abs().max()) > 1e-4 * gap:
        raise QuantizerError(f"quantizer '{name}' cannot run on integers: its levels are not uniformly spaced")
    for stride in (1, 2):
        unit = gap / stride
        codes = levels / unit
        if float((codes - codes.round()).abs().max()) < 1e-3:
            return IntegerSpec(unit, int(codes.round().min()), int(codes.round().max()), stride=stride)
    raise QuantizerError(
        f"quantizer '{name}' cannot run on integers: its levels are uniform but not integer multiples of one step"
    )
