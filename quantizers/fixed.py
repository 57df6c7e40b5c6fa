"""Fixed-step baselines: LSQ's forward and input gradient with a step that is set once from data and never learned.

Modes (spec section 4): ``lsq-init`` = 2*mean|v|/sqrt(Q_P) (the paper's init, frozen; default), ``max`` =
max|v|/Q_P (no clipping), ``mse`` = the MSE-optimal step by grid search: ``grid_points`` linear candidates in
(0, max|v|/Q_P], then the same number again around the best one (MSE(s) is not convex, so no local solver alone).

``per_channel=True`` (weights only, as for ``lsq``): one frozen step per output channel (axis 0), each set by the mode
on its own channel; integer and ONNX export write one step per output channel.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from .base import Quantizer, QuantizerError, check_choice, lsq_init_step
from .integer import IntegerSpec
from .kernels import lsq_quantize, lsq_quantize_per_channel
from .lsq import PerChannelStep, check_bool
from .registry import register

MODES = ("lsq-init", "max", "mse")
MSE_MAX_SAMPLES = 1 << 18  # grid search on at most this many elements (a strided subsample), to bound its cost


def mse_optimal_step(v: Tensor, qn: int, qp: int, grid_points: int = 200) -> float:
    """The step minimizing mean((Q(v; s) - v)^2) over a two-stage grid (coarse linear, then refined around the best)."""
    flat = v.detach().flatten().double()  # float64: squares of large inputs must not overflow
    if flat.numel() > MSE_MAX_SAMPLES:
        flat = flat[:: flat.numel() // MSE_MAX_SAMPLES + 1]
    upper = float(flat.abs().max()) / qp
    if not upper > 0:
        return 1e-8

    def best_of(candidates: Tensor) -> tuple[float, float]:
        errors = torch.stack(
            [((torch.clamp(torch.round(flat / s), -qn, qp) * s - flat) ** 2).mean() for s in candidates]
        )
        index = int(torch.argmin(errors))
        return float(candidates[index]), float(candidates[1] - candidates[0]) if candidates.numel() > 1 else 0.0

    coarse = torch.linspace(upper / grid_points, upper, grid_points)
    best, spacing = best_of(coarse)
    fine = torch.linspace(max(best - spacing, upper * 1e-4), best + spacing, grid_points)
    return best_of(fine)[0]


@register("fixed")
class FixedStep(PerChannelStep, Quantizer):
    """Fixed step set once from data (lsq-init, max or MSE-optimal), never learned; straight-through input gradient."""

    def __init__(
        self, bits: int, signed: bool, role: str | None = None, mode: str = "lsq-init", grid_points: int = 200,
        per_channel: bool = False,
    ) -> None:
        super().__init__(bits, signed, role)
        check_choice("fixed", "mode", mode, MODES)
        if grid_points < 2:
            raise QuantizerError(f"fixed grid_points must be at least 2, got {grid_points}")
        self.mode = mode
        self.grid_points = int(grid_points)
        self.per_channel = check_bool("fixed", "per_channel", per_channel) and self.role == "weight"
        self.register_buffer("step_size", torch.tensor(1.0))

    def initialize(self, v: Tensor) -> None:
        if self.channels_of(v) is not None:
            steps = [self.step_from_data(channel) for channel in v.detach().unbind(0)]
            self.resize_steps(torch.tensor(steps))
            self.mark_initialized()
        else:
            self.set_step(self.step_from_data(v))

    def step_from_data(self, v: Tensor) -> float:
        """The step ``mode`` gives for ``v`` (positive, finite)."""
        if self.mode == "lsq-init":
            step = lsq_init_step(v, self.qp)
        elif self.mode == "max":
            step = max(float(v.detach().abs().max()) / self.qp, 1e-8)
        else:
            step = mse_optimal_step(v, self.qn, self.qp, self.grid_points)
        return step if math.isfinite(step) and step > 0 else 1e-8

    def quantize(self, v: Tensor) -> Tensor:
        if self.steps_for(v) is not None:
            return lsq_quantize_per_channel(v, self.step_size, self.qn, self.qp)
        return lsq_quantize(v, self.step_size, self.qn, self.qp)

    def apply_step(self, step: float) -> None:
        self.step_size.fill_(step)

    def levels(self) -> Tensor:
        codes = torch.arange(-self.qn, self.qp + 1, dtype=self.step_size.dtype, device=self.step_size.device)
        if self.step_size.dim() != 0:  # per channel: every channel's grid, merged
            return torch.unique(codes * self.step_size.reshape(-1, 1))
        return codes * self.step_size

    def integer_spec(self) -> IntegerSpec:
        return self.step_spec(self.step_size)

    def current_step(self) -> float:
        """The step; per channel, the mean of the channels' steps (for layer tables)."""
        return float(self.step_size.mean())

    def range_parameters(self) -> dict:
        return {}  # nothing is learned: Figure 2 shows it as such
