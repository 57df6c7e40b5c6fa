"""What a quantizer looks like on integers: ``IntegerSpec``, the contract behind export and integer inference.

A quantized layer runs on integers when each of its quantizers can say ``output = code * step`` with integer codes
(``Quantizer.integer_spec()``); activations also need the requantizer, float input -> code, written exactly as the
fake quantizer computes it so that the codes agree bit for bit (LSQ paper, Figure 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from .errors import QuantizerError


@dataclass
class IntegerSpec:
    """A quantizer as integers: its output is ``code * step`` with integer ``code`` in ``[lo, hi]`` (every ``stride``-th).

    Activations also need the requantizer, float input -> code, written as the fake quantizer computes it:
    ``clamp(round(((x - offset) / width) * multiplier), lo, hi)`` (on ``|x|``, then times ``sign(x)``, when
    ``magnitude``). ``width`` is None for a quantizer that can only give weight codes.
    """

    step: float
    lo: int
    hi: int
    stride: int = 1
    offset: float = 0.0
    width: float | None = None
    multiplier: float = 1.0
    magnitude: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def coerce(cls, spec: IntegerSpec | dict[str, Any]) -> IntegerSpec:
        """A spec, or the dict a plugin's ``integer_spec()`` may return (the form before ``IntegerSpec`` existed)."""
        return spec if isinstance(spec, cls) else cls(**spec)


def exact_float(value: Tensor | float) -> float:
    """A 0-d tensor as a Python float holding its exact value (float32 values are exact in float64)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


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
