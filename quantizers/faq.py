"""FAQ: fine-tuning after quantization (McKinstry, Esser, Appuswamy, Bablani, Arthur, Yildiz, Modha, 2018, arXiv
1809.04191, "Discovering low-precision networks close to full-precision networks for efficient embedded inference").

No public code is known. What the paper's abstract states (read): start from the pretrained full-precision network
and fine-tune it quantized, with larger batches and matched learning-rate annealing; 8-bit networks after one epoch
of fine-tuning, 4-bit networks after longer fine-tuning; the quantizers themselves are fixed, not learned. What
quantbench could not confirm from reachable material: how the quantizer ranges are chosen. The closest reading,
from secondary sources and the zoo note ([U]): ranges from the pretrained network's statistics, activations from a
high percentile of the observed distribution.

So ``faq`` is :class:`quantizers.fixed.FixedStep` (LSQ's uniform forward and straight-through input gradient, a step
set once and never learned) with the step set by a percentile: ``step = P_p(|v|) / Q_P``, ``p = percentile``
(default 99.99), for weights (the pretrained weights) and activations (the initialization batch) alike.

Conventions (recorded in ``options()``), where quantbench departs from (or cannot confirm) the paper:
* the percentile rule and its value for both roles are the closest reading, not confirmed; ``percentile=100`` is
  the max (``fixed``'s ``mode=max``).
* calibration: the first global batch (quantbench initializes every quantizer from it), not "a few batches".
* the recipe: FAQ's own batch size and LR annealing are not reproduced; it runs under the comparison's recipe
  (LSQ's, which the same group derived from it: cosine decay, 1 epoch at 8 bits). FAQ published 4 and 8 bits only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import QuantizerError
from .fixed import MSE_MAX_SAMPLES, FixedStep
from .registry import register


def percentile_of_magnitude(v: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of ``|v|`` (nearest rank; a strided subsample of at most MSE_MAX_SAMPLES)."""
    flat = v.detach().abs().flatten().double()
    if flat.numel() > MSE_MAX_SAMPLES:
        flat = flat[:: flat.numel() // MSE_MAX_SAMPLES + 1]
    if flat.numel() == 0:
        return 0.0
    rank = min(flat.numel(), max(1, math.ceil(percentile / 100.0 * flat.numel())))
    return float(torch.kthvalue(flat, rank).values)


@register("faq")
class FAQ(FixedStep):
    """FAQ (McKinstry et al. 2018): fixed uniform quantizer, step from a high percentile of |v|, never learned."""

    def __init__(self, bits: int, signed: bool, role: str | None = None, percentile: float = 99.99,
                 per_channel: bool = False) -> None:
        super().__init__(bits, signed, role, mode="max", per_channel=per_channel)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise QuantizerError(f"faq percentile must be in (0, 100] (100 = max|v|), got {percentile!r}")
        self.percentile = float(percentile)

    def step_from_data(self, v: Tensor) -> float:
        step = percentile_of_magnitude(v, self.percentile) / self.qp
        return step if math.isfinite(step) and step > 1e-8 else (1e-8 if math.isfinite(step) else 1.0)

    def conventions(self) -> dict[str, Any]:
        return {"range": f"step = P{self.percentile:g}(|v|) / Q_P on the init batch (closest reading, unconfirmed)",
                "learned": "nothing (fixed quantizer; the method is the fine-tuning recipe)"}
