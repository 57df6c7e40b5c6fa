"""Regularization (Choi, El-Khamy, Lee, 2018, arXiv 1809.00095, "Learning low precision deep neural networks
through regularization"): the LSQ paper's Table 1 "Regularization" row.

No public code is known, and the paper's text was not reachable: this is the closest reading of its description
(zoo note, [U]): a mean-squared-quantization-error (MSQE) regularizer on weights and activations with learnable
scaling factors (the quantization steps), its coefficient increased over training, then hard quantization.

quantbench's reading, every piece a convention (recorded in ``options()``):
* a uniform grid ``clamp(round(v / s), -Q_N, Q_P) s`` with a learnable step ``s``, initialized MSE-optimal on the
  init data (``fixed``'s grid search);
* the regularizer, ``regularization()``, summed into the loss by the training loop:
  ``lambda(t) * mean((v - c s)^2) / stopgrad(mean(v^2))`` over the latest training forward's input, with codes
  ``c`` frozen, so it pulls ``v`` to its level and fits ``s`` by least squares (``s`` learns from it alone: the
  task loss reaches ``s`` nowhere). Normalized by ``mean(v^2)`` so weights and activations weigh alike.
* ``lambda(t)`` rises linearly from 0 to ``reg_weight`` over the first ``soft_fraction`` of training (the training
  loop's ``Stage`` signal) and stays there; the paper's own schedule (a learnable coefficient, as its abstract
  describes it) is not reproduced.
* forward: during the first ``soft_fraction`` of training (default 0.5) the full-precision value (soft phase:
  the regularizer alone moves values towards the grid), then the hard quantizer with a straight-through estimator
  (gradient 1 inside the grid's range, 0 outside). Evaluation, export and the conformance kit (no stage) always
  see the hard quantizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import FINAL_STAGE, Quantizer, QuantizerError, Stage
from .fixed import mse_optimal_step
from .integer import IntegerSpec, exact_float
from .registry import register
from .ste import round_ste, stop_gradient

MIN_STEP = 1e-8


@register("msqe_reg")
class MSQERegularized(Quantizer):
    """MSQE regularization (Choi et al. 2018, closest reading): learned step fitted by an annealed MSQE loss term."""

    def __init__(self, bits: int, signed: bool, role: str | None = None, reg_weight: float = 0.1,
                 soft_fraction: float = 0.5) -> None:
        super().__init__(bits, signed, role)
        if isinstance(reg_weight, bool) or not isinstance(reg_weight, (int, float)) or not (
                math.isfinite(reg_weight) and reg_weight >= 0):
            raise QuantizerError(f"msqe_reg reg_weight must be a finite number >= 0, got {reg_weight!r}")
        if isinstance(soft_fraction, bool) or not isinstance(soft_fraction, (int, float)) or not 0 <= soft_fraction < 1:
            raise QuantizerError(f"msqe_reg soft_fraction must be in [0, 1) (0: hard quantization throughout), "
                                 f"got {soft_fraction!r}")
        self.reg_weight, self.soft_fraction = float(reg_weight), float(soft_fraction)
        self.step_size = nn.Parameter(torch.tensor(1.0))
        self.stage = FINAL_STAGE
        self.soft_phase = False
        self._last_input: Tensor | None = None  # the latest training forward's input, for the regularizer

    # ---- operating point -----------------------------------------------------------------------------------------

    def initialize(self, v: Tensor) -> None:
        self.set_step(max(mse_optimal_step(v, self.qn, self.qp), MIN_STEP))

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.step_size.fill_(step)

    def effective_step(self) -> Tensor:
        return self.step_size.abs().clamp_min(MIN_STEP)

    # ---- stage -----------------------------------------------------------------------------------------------------

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage
        self.soft_phase = stage.progress < self.soft_fraction  # what the forward reads (compile guards one bool)
        self._last_input = None  # a new step: an input from an earlier graph must not reach this step's loss

    def soft(self) -> bool:
        return self.training and self.soft_phase

    def coefficient(self) -> float:
        """lambda(t): linear from 0 to reg_weight over the soft phase, then reg_weight."""
        if self.soft_fraction == 0:
            return self.reg_weight
        return self.reg_weight * min(1.0, self.stage.progress / self.soft_fraction)

    def conformance_stages(self) -> list[tuple[str, Stage]]:
        return [("soft phase", Stage(0, 1))] if self.soft_fraction > 0 else []

    # ---- forward and regularizer -----------------------------------------------------------------------------------

    def quantize(self, v: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            self._last_input = v
        if self.soft():
            return v
        step = stop_gradient(self.effective_step()).to(v.dtype)
        return round_ste(torch.clamp(v / step, -self.qn, self.qp)) * step

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        self._last_input = None  # moved or cast: an input of the old device or dtype must not reach the loss
        return super()._apply(fn, *args, **kwargs)

    def regularization(self) -> Tensor:
        step = self.effective_step()
        v, self._last_input = self._last_input, None
        if v is None:
            return step.sum() * 0.0  # keeps the step in the graph (data parallel expects every parameter's gradient)
        codes = torch.clamp(torch.round(v.detach() / step.detach().to(v.dtype)), -self.qn, self.qp)
        dtype = torch.promote_types(v.dtype, torch.float32)  # at least float32 for a mixed-precision input
        error = (v - codes * step.to(v.dtype)).to(dtype)
        scale = v.detach().to(dtype).pow(2).mean().clamp_min(1e-12)
        return self.coefficient() * error.pow(2).mean() / scale

    # ---- interface -----------------------------------------------------------------------------------------------

    def levels(self) -> Tensor:
        step = self.effective_step().detach()
        return torch.arange(-self.qn, self.qp + 1, dtype=step.dtype, device=step.device) * step

    def current_step(self) -> float:
        return float(self.effective_step().detach())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {"step_size": self.step_size}

    def integer_spec(self) -> IntegerSpec:
        step = exact_float(self.effective_step())
        return IntegerSpec(step, -self.qn, self.qp, width=step)

    def conventions(self) -> dict[str, Any]:
        return {"regularizer": "lambda(t) mean((v - c s)^2) / mean(v^2), codes frozen; s learns from it alone",
                "schedule": "lambda linear 0 -> reg_weight over the soft phase, then constant (closest reading)",
                "forward": "full precision in the soft phase, then round(clamp(v / s)) s with a straight-through "
                           "estimator"}
