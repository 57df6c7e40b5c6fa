"""TQT: Trained Quantization Thresholds (Jain, Gural, Wu, Dick, MLSys 2020, "Trained quantization thresholds for
accurate and efficient fixed-point inference of deep neural networks").

A power-of-two step from a learned log-threshold: ``s = 2^ceil(log2 t) / 2^(b-1)`` (signed; unsigned divides by 2^b),
``v_hat = clamp(round(v / s), -Q_N, Q_P) * s``. The ceil passes straight through (``log2 t + stop_gradient(ceil -
log2 t)``), so ``d v_hat / d log2 t = s ln2 (round(v/s) - v/s)`` inside and ``s ln2 * (-Q_N or Q_P)`` clipped (paper
eq. 7-8); the input gradient is straight-through inside the range. Built on LSQ's fused op (the step gradient it
returns, chained through ``s = 2^(...)``, is exactly that).

Conventions (recorded in ``options()``), where the paper and the canonical code (ModelTC/MQBench
mqbench/fake_quantize/tqt.py) differ or are silent:
* parameter: ``log2 t`` (the paper's); MQBench learns the scale itself and rounds it to a power of two.
* optimizer rule: the paper normalizes the log-threshold gradient with Adam; quantbench trains every quantizer with
  the same SGD recipe, so by default the gradient is scaled by LSQ's g = 1/sqrt(N Q_P) (``grad_scale="full"``, N as
  LSQ's ``activation_n="batch"``), the same normalization LSQ uses for SGD. ``grad_scale="none"`` is the paper's raw
  gradient (use it with an Adam group).
* boundaries (``boundary``): ``"rounded"`` (default, canonical: paper eq. 7-8, Vitis-AI ``TQTQuantize``, MQBench):
  a value is inside when round(v/s) is in [-Q_N, Q_P], so v/s in (Q_P, Q_P + 1/2) is inside (input gradient 1,
  threshold term round(v/s) - v/s). ``"strict"``: LSQ's strict interior on the unrounded v/s, through LSQ's fused op
  (faster); it differs on that half-step band at each end, not a measure-zero set. Ties round to even (MQBench rounds
  negative ties up: measure zero).
* init: ``t`` from LSQ's initial step, ``log2 t = log2(s0 * 2^(b-1))`` (signed; ``2^b`` unsigned), so before the ceil
  TQT starts where LSQ starts (the paper initializes from the max or a KL-calibrated threshold).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, check_choice
from .integer import IntegerSpec, exact_float
from .kernels import lsq_quantize
from .lsq import GRAD_SCALES, lsq_grad_scale
from .registry import register
from .ste import round_ste, scale_grad, stop_gradient

BOUNDARIES = ("rounded", "strict")


def rounded_interior_quantize(v: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    """``clamp(round(v/s), -qn, qp) * s`` with TQT's gradients: inside where round(v/s) is in [-qn, qp], where
    d/dv = 1 and d/ds = round(v/s) - v/s; outside d/dv = 0 and d/ds = the clip code."""
    z = v / step
    with torch.no_grad():
        rounded = torch.round(z)
        inside = (rounded >= -qn) & (rounded <= qp)
        clipped = torch.clamp(rounded, -qn, qp)
    codes = torch.where(inside, round_ste(z), clipped)
    return (codes * step).to(v.dtype)


@register("tqt")
class TQT(Quantizer):
    """Trained quantization thresholds (TQT, Jain et al. 2020): power-of-two step from a learned log2 threshold."""

    def __init__(self, bits: int, signed: bool, role: str | None = None, grad_scale: str = "full",
                 boundary: str = "rounded") -> None:
        super().__init__(bits, signed, role)
        self.grad_scale = check_choice("tqt", "grad_scale", grad_scale, GRAD_SCALES)
        self.boundary = check_choice("tqt", "boundary", boundary, BOUNDARIES)
        # s = 2^ceil(log2 t) / divisor: the threshold t sits at the top of the signed range (2^(b-1) steps) or of
        # the unsigned one (2^b steps)
        self.divisor = 2 ** (bits - 1) if self.signed else 2**bits
        self.log2_threshold = nn.Parameter(torch.tensor(0.0))
        self.last_n: int | None = None

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.log2_threshold.fill_(math.log2(step * self.divisor))

    def step_tensor(self) -> Tensor:
        """The power-of-two step, differentiable in ``log2 t`` through a straight-through ceil."""
        exponent = self.log2_threshold
        exponent = exponent + stop_gradient(torch.ceil(exponent) - exponent)
        return torch.exp2(exponent) / self.divisor

    def quantize(self, v: Tensor) -> Tensor:
        self.last_n = self.gradient_count(v)
        g = lsq_grad_scale(self.grad_scale, self.last_n, self.qp)
        step = self.step_tensor()
        # g scales the log-threshold gradient only: apply it to log2 t's contribution by scaling the step's gradient
        step = scale_grad(step, g)
        if self.boundary == "strict":
            return lsq_quantize(v, step, self.qn, self.qp)
        return rounded_interior_quantize(v, step, self.qn, self.qp)

    def levels(self) -> Tensor:
        step = self.step_tensor().detach()
        return torch.arange(-self.qn, self.qp + 1, device=step.device, dtype=step.dtype) * step

    def current_step(self) -> float:
        return float(self.step_tensor().detach())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {"log2_threshold": self.log2_threshold}

    def integer_spec(self) -> IntegerSpec:
        step = exact_float(self.step_tensor().float())  # a power of two: exact in float32
        return IntegerSpec(step, -self.qn, self.qp, width=step)

    def conventions(self) -> dict[str, Any]:
        return {
            "step": f"2^ceil(log2 t) / {self.divisor} (power of two)",
            "ceil_gradient": "straight-through",
            "inside": "where round(v/s) is in range (paper eq. 7-8, MQBench)" if self.boundary == "rounded"
            else "strict interior on unrounded v/s (LSQ eq. 3, 5)",
            "init": "log2 t from LSQ's initial step",
        }
