"""APoT: Additive Powers-of-Two quantization (Li, Dong, Wang, ICLR 2020, "Additive powers-of-two quantization: an
efficient non-uniform discretization for neural networks").

Levels are sums of powers of two, normalized so the largest is 1, times a learned clip ``alpha`` (canonical code:
yhhhli/APoT_Quantization ImageNet/models/quant_layer.py, ``build_power_value`` and ``apot_quantization``):

    x = clamp(v / alpha, -1, 1)   (signed: sign kept, magnitude levels)   or   clamp(v / alpha, 0, 1)   (unsigned)
    v_hat = alpha * straight_through(project(x), x)     (forward project(x), gradient that of x)

``project`` is the nearest level; the input gradient is straight-through inside the clip, and alpha gets the code's
"reparameterized clipping" gradient ``project(x) - x`` inside and ``+-1`` clipped, through ``x`` and the outer
``alpha``. Weights are first standardized per layer, ``(w - mean) / std`` (mean and std differentiated, as the code).

Conventions (recorded in ``options()``), where quantbench departs from the code:
* levels: signed tensors use ``b - 1`` bits of magnitude and a sign (the code's weights), unsigned ones ``b`` bits
  (its activations). The code builds additive levels for 2..6 magnitude bits; 2-bit weights (1 magnitude bit) and
  any width outside 2..6 (e.g. the 8-bit first/last layers) use the uniform grid, as the code does for 2-bit weights
  and its 8-bit first/last layers.
* output scale: the code feeds standardized weights to the conv and lets BatchNorm absorb the scale; quantbench
  multiplies the standardized weight's quantized value by ``weight_scale``, a buffer holding std(w) at init, so
  weights stay at their scale in pre-activation residual blocks (``weight_norm="none"`` skips standardization).
* projection ties (a value exactly between two levels) go to the upper level (the code picks whichever comes first
  in an unordered set); measure zero.
* init: the code's constants, weight alpha 3.0 (in std units) and activation alpha 6.0 (``init="code"``), or
  ``init="lsq"``: alpha at the LSQ operating point ``Q_P s0`` (the clip of LSQ's initial grid).
* non-uniform: no integer export (refused with the reason).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerError, check_choice, lsq_init_step
from .integer import IntegerSpec
from .registry import register
from .kernels.apot import apot_quantize

INITS = ("code", "lsq")
WEIGHT_NORMS = ("standardize", "none")
ADDITIVE_BITS = range(2, 7)  # magnitude widths the canonical build_power_value supports


def power_levels(magnitude_bits: int) -> list[float]:
    """The canonical additive powers-of-two magnitudes in [0, 1] for ``magnitude_bits`` bits (uniform outside 2..6).

    The sums are split into up to three additive terms whose exponents interleave, as in ``build_power_value``.
    """
    if magnitude_bits not in ADDITIVE_BITS:
        count = 2**magnitude_bits - 1
        return [index / count for index in range(count + 1)]
    terms: list[list[float]] = [[0.0], [0.0], [0.0]]
    if magnitude_bits == 2:
        terms[0] += [2.0 ** (-i - 1) for i in range(3)]
    elif magnitude_bits == 4:
        terms[0] += [2.0 ** (-2 * i - 1) for i in range(3)]
        terms[1] += [2.0 ** (-2 * i - 2) for i in range(3)]
    elif magnitude_bits == 6:
        terms[0] += [2.0 ** (-3 * i - 1) for i in range(3)]
        terms[1] += [2.0 ** (-3 * i - 2) for i in range(3)]
        terms[2] += [2.0 ** (-3 * i - 3) for i in range(3)]
    elif magnitude_bits == 3:
        terms[0] += [0.5, 0.25, 2.0**-4]
        terms[1] += [2.0**-3]
    else:  # 5
        terms[0] += [0.5, 2.0**-3, 2.0**-6]
        terms[1] += [0.25, 2.0**-4, 2.0**-7]
        terms[2] += [2.0**-5]
    sums = sorted({a + b + c for a in terms[0] for b in terms[1] for c in terms[2]})
    return [value / sums[-1] for value in sums]


@register("apot")
class APoT(Quantizer):
    """Additive powers-of-two (APoT, Li et al. 2020): non-uniform levels times a learned clip alpha."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        init: str = "code",
        weight_norm: str = "standardize",
        min_alpha: float = 1e-8,
    ) -> None:
        super().__init__(bits, signed, role)
        self.init = check_choice("apot", "init", init, INITS)
        self.weight_norm = check_choice("apot", "weight_norm", weight_norm, WEIGHT_NORMS)
        self.min_alpha = float(min_alpha)
        self.standardize = self.role == "weight" and self.weight_norm == "standardize"
        self.idempotent = not self.standardize  # re-standardizing the output moves it off the grid
        self.magnitude_bits = bits - 1 if self.signed else bits
        magnitudes = torch.tensor(power_levels(self.magnitude_bits), dtype=torch.float64)
        unit = torch.cat([-magnitudes.flip(0)[:-1], magnitudes]) if self.signed else magnitudes
        # the normalized levels in [-1, 1] / [0, 1] and the midpoints between them (projection thresholds)
        # (kept in float64 so a float64 quantizer sees the exact levels; cast to the input's dtype where used)
        self.register_buffer("unit_levels", unit, persistent=False)
        self.register_buffer("thresholds", (unit[1:] + unit[:-1]) / 2, persistent=False)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("weight_scale", torch.tensor(1.0))  # std(w) at init: output back at the weights' scale

    # ---- operating point -----------------------------------------------------------------------------------------

    def initialize(self, v: Tensor) -> None:
        if self.standardize:
            std = float(v.float().std()) if v.numel() > 1 else 1.0
            self.weight_scale.fill_(std if math.isfinite(std) and std > 1e-12 else 1.0)
        if self.init == "code":
            with torch.no_grad():
                self.alpha.fill_(3.0 if self.role == "weight" else 6.0)
        else:
            data = self.normalized_input(v.detach().float()) if self.standardize else v
            with torch.no_grad():
                self.alpha.fill_(lsq_init_step(data, max(self.qp, 1)) * self.qp)
        self.mark_initialized()

    def apply_step(self, step: float) -> None:
        # alpha at the clip of a uniform b-bit grid of step s (Q_P s); the output scale returns to 1
        with torch.no_grad():
            self.alpha.fill_(step * self.qp)
            self.weight_scale.fill_(1.0)

    def effective_alpha(self) -> Tensor:
        return self.alpha.abs().clamp_min(self.min_alpha)

    # ---- forward -------------------------------------------------------------------------------------------------

    def normalized_input(self, v: Tensor) -> Tensor:
        """``(w - mean) / std`` over the whole tensor (weights; a tensor of one element is left as it is)."""
        if v.numel() < 2:
            return v
        mean = v.mean()
        std = v.std().clamp_min(1e-12)
        return (v - mean) / std

    def quantize(self, v: Tensor) -> Tensor:
        data = self.normalized_input(v) if self.standardize else v
        out_scale = self.weight_scale if self.standardize else torch.ones_like(self.weight_scale)
        dtype = data.dtype  # the fused op (comparison chain, one pass each way); its reference: bucketize and gather
        return apot_quantize(data, self.effective_alpha().to(dtype), self.thresholds.to(dtype),
                             self.unit_levels.to(dtype), -1.0 if self.signed else 0.0, out_scale.to(dtype)).to(v.dtype)

    # ---- interface -----------------------------------------------------------------------------------------------

    def levels(self) -> Tensor:
        scale = self.effective_alpha().detach() * self.weight_scale
        return (self.unit_levels * scale.double()).to(scale.dtype)

    def current_step(self) -> float:
        levels = self.levels()
        return float((levels[1:] - levels[:-1]).min())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {"alpha": self.alpha}

    def integer_spec(self) -> IntegerSpec:
        gaps = self.unit_levels[1:] - self.unit_levels[:-1]
        if float((gaps - gaps.mean()).abs().max()) > 1e-6:
            raise QuantizerError(
                f"quantizer 'apot' at {self.bits} bits has non-uniform (additive powers-of-two) levels: integer codes "
                "times one step cannot represent them; keep its layers in full precision or use a uniform quantizer"
            )
        if self.role != "weight":
            raise QuantizerError(
                "quantizer 'apot' activations have no integer requantizer in quantbench (uniform only at this width); "
                "keep its layers in full precision"
            )
        return super().integer_spec()

    def conventions(self) -> dict[str, Any]:
        return {
            "levels": ("additive powers of two" if self.magnitude_bits in ADDITIVE_BITS else "uniform")
                      + f", {self.magnitude_bits} magnitude bits" + (" plus sign" if self.signed else ""),
            "alpha_gradient": "project(x) - x inside, +-1 clipped (reparameterized clipping)",
            "output_scale": "std(w) at init" if self.standardize else "none",
        }
