"""DSQ: Differentiable Soft Quantization (Gong, Liu, Jiang, Li, Hu, Lin, Yu, Yan, ICCV 2019, "Differentiable soft
quantization: bridging full-precision and low-bit neural networks").

Inside the clip range each cell of width Delta (one step) gets the soft staircase ``phi(x) = k_s tanh(k (x - m_i))``
around the cell centre m_i, with ``k_s = 1 / tanh(k Delta / 2)`` and the "characteristic variable"
``alpha = 1 - tanh(k Delta / 2)`` (0 < alpha < 0.5; smaller is closer to a hard staircase). On the code axis
``z = clamp(v / s, -Q_N, Q_P)`` (Delta = 1) that is, as in the canonical code (ModelTC/MQBench
mqbench/fake_quantize/dsq.py; ricky40403/DSQ DSQConv.py)::

    soft = floor(z) + 1/2 + (k_s / 2) tanh(k (z - floor(z) - 1/2)),   k_s = 1 / (1 - alpha),  k = ln((2 - alpha) / alpha)
    v_hat = round_ste(soft) * s

so the forward is the hard staircase (``round(soft) == round(z)``) and the backward is the soft function's derivative
(``k_s k / 2 (1 - tanh^2)`` per unit of z, largest at the cell centre's rounding threshold).

Conventions (recorded in ``options()``):
* range: the paper learns (l, u); quantbench learns the step s of a uniform grid ``[-Q_N s, Q_P s]`` with LSQ's
  gradient scale g (``grad_scale``; N as LSQ's ``activation_n="batch"``), the gradient reaching s through the soft
  function and the outer ``* s`` (MQBench instead sets the range from an observer and learns nothing).
* alpha: fixed at 0.4 (MQBench's default, ``learn_alpha=False``) or learned (the paper, ``learn_alpha=True``, kept in
  [``min_alpha``, 0.5) and receiving the soft function's gradient, unscaled).
* init: LSQ's step, so DSQ starts from LSQ's forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerError, check_choice
from .integer import IntegerSpec, exact_float
from .lsq import GRAD_SCALES, check_bool, lsq_grad_scale
from .registry import register
from .kernels.dsq import dsq_quantize


@register("dsq")
class DSQ(Quantizer):
    """Differentiable soft quantization (DSQ, Gong et al. 2019): hard forward, tanh soft-staircase backward."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        alpha: float = 0.4,
        learn_alpha: bool = False,
        grad_scale: str = "full",
        min_step: float = 1e-8,
        min_alpha: float = 1e-3,
    ) -> None:
        super().__init__(bits, signed, role)
        if not 0.0 < float(alpha) < 0.5:
            raise QuantizerError(f"dsq alpha must be in (0, 0.5) (smaller is closer to a hard staircase), got {alpha}")
        self.alpha = float(alpha)
        self.learn_alpha = check_bool("dsq", "learn_alpha", learn_alpha)
        self.grad_scale = check_choice("dsq", "grad_scale", grad_scale, GRAD_SCALES)
        self.min_step = float(min_step)
        self.min_alpha = float(min_alpha)
        self.step_size = nn.Parameter(torch.tensor(1.0))
        if self.learn_alpha:
            self.alpha_parameter = nn.Parameter(torch.tensor(self.alpha))
        self.last_n: int | None = None

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.step_size.fill_(step)

    def effective_step(self) -> Tensor:
        return self.step_size.abs().clamp_min(self.min_step)

    def effective_alpha(self) -> Tensor | float:
        if not self.learn_alpha:
            return self.alpha
        return self.alpha_parameter.clamp(self.min_alpha, 0.5 - 1e-3)

    def quantize(self, v: Tensor) -> Tensor:
        self.last_n = self.gradient_count(v)
        g = lsq_grad_scale(self.grad_scale, self.last_n, self.qp)
        alpha = self.effective_alpha()
        alpha = alpha.to(v.dtype) if isinstance(alpha, Tensor) else torch.tensor(alpha, dtype=v.dtype, device=v.device)
        # the fused op (one pass each way); its reference is the composite soft staircase with round_ste
        return dsq_quantize(v, self.effective_step().to(v.dtype), alpha, self.qn, self.qp, g).to(v.dtype)

    def levels(self) -> Tensor:
        step = self.effective_step().detach()
        return torch.arange(-self.qn, self.qp + 1, device=step.device, dtype=step.dtype) * step

    def current_step(self) -> float:
        return float(self.effective_step().detach())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        parameters = {"step_size": self.step_size}
        if self.learn_alpha:
            parameters["alpha"] = self.alpha_parameter
        return parameters

    def integer_spec(self) -> IntegerSpec:
        step = exact_float(self.effective_step())  # forward = LSQ's: clamp(round(v/s), -Q_N, Q_P) * s
        return IntegerSpec(step, -self.qn, self.qp, width=step)

    def conventions(self) -> dict[str, Any]:
        return {
            "soft_function": "floor(z) + 1/2 + k_s/2 tanh(k (z - floor(z) - 1/2)), k_s = 1/(1 - alpha), "
                             "k = ln((2 - alpha)/alpha)",
            "range": "learned step s on [-Q_N s, Q_P s], LSQ gradient scale",
            "sharpness_at_alpha": round(math.log((2 - self.alpha) / self.alpha), 6),
        }
