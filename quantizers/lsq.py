"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020), equations 1-3 and 5.

Conventions (recorded by ``options()``):
* boundaries: the paper's, a strict interior on the unrounded v/s; at v/s = Q_P exactly the step gradient is Q_P and
  the input gradient 0 (PyTorch's fused kernel calls values that *round* into range "inside" instead);
* gradient scale g: ``full`` = 1/sqrt(N * Q_P) (paper), ``numel`` = 1/sqrt(N), ``none`` = 1, times ``grad_scale_mult``;
* N: the weight tensor's numel for weights; for activations the paper's "number of features" is undefined, so
  ``activation_n="batch"`` (numel of the batch tensor, as lsq-net / MQBench / torch.ao) or ``"sample"`` (per sample).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, check_choice, data_parallel_size
from .integer import IntegerSpec, exact_float
from .kernels import lsq_quantize
from .registry import register

GRAD_SCALES = ("full", "numel", "none")
ACTIVATION_N = ("batch", "sample")


def lsq_grad_scale(mode: str, n: int, qp: int, multiplier: float = 1.0) -> float:
    """LSQ's step-gradient scale g for ``n`` elements: full 1/sqrt(N*Qp), numel 1/sqrt(N), none 1; times multiplier."""
    if mode == "full":
        return multiplier / math.sqrt(n * qp)
    if mode == "numel":
        return multiplier / math.sqrt(n)
    return multiplier


@register("lsq")
class LSQ(Quantizer):
    """Learned step size (LSQ, Esser et al. 2020): learnable step, gradient scaled by 1/sqrt(N*Qp)."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        grad_scale: str = "full",
        grad_scale_mult: float = 1.0,
        activation_n: str = "batch",
        min_step: float = 1e-8,
    ) -> None:
        super().__init__(bits, signed, role)
        self.grad_scale = check_choice("lsq", "grad_scale", grad_scale, GRAD_SCALES)
        self.grad_scale_mult = float(grad_scale_mult)
        self.activation_n = check_choice("lsq", "activation_n", activation_n, ACTIVATION_N)
        self.min_step = float(min_step)
        self.step_size = nn.Parameter(torch.tensor(1.0))
        #: N used for the gradient scale on the latest forward (reported in layer tables)
        self.last_n: int | None = None

    def gradient_n(self, v: Tensor) -> int:
        """N in g = 1/sqrt(N*Qp): the number of terms summed into this step's gradient (see module docstring)."""
        if self.role == "activation" and self.activation_n == "sample" and v.dim() > 1:
            return max(1, v.numel() // v.shape[0])
        if self.role == "activation":  # the global batch: a rank sees only its share of it
            return max(1, v.numel()) * data_parallel_size()
        return max(1, v.numel())

    def effective_step(self) -> Tensor:
        # Kept positive (the paper has no guard; negative steps are a known failure of copies without one).
        return self.step_size.abs().clamp_min(self.min_step)

    def quantize(self, v: Tensor) -> Tensor:
        self.last_n = self.gradient_n(v)
        g = lsq_grad_scale(self.grad_scale, self.last_n, self.qp, self.grad_scale_mult)
        return lsq_quantize(v, self.effective_step(), self.qn, self.qp, g)

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.step_size.fill_(step)

    def levels(self) -> Tensor:
        step = self.effective_step().detach()
        return torch.arange(-self.qn, self.qp + 1, device=step.device, dtype=step.dtype) * step

    def current_step(self) -> float:
        return float(self.effective_step().detach())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {"step_size": self.step_size}

    def integer_spec(self) -> IntegerSpec:
        step = exact_float(self.effective_step())  # codes clamp(round(v/s), -Q_N, Q_P), value code * s
        return IntegerSpec(step, -self.qn, self.qp, width=step)

    def conventions(self) -> dict[str, Any]:
        return {"boundary": "strict interior on unrounded v/s (paper eq. 3, 5)"}
