"""LSQ+ (Bhalgat, Lee, Nagel, Blankevoort, Kwak, CVPR Workshops 2020, "LSQ+: Improving low-bit quantization through
learnable offsets and better initialization").

``v_hat = clamp(round((v - beta) / s), -Q_N, Q_P) * s + beta`` with a learnable step ``s`` and offset ``beta``.
Gradients: d v_hat / d s is LSQ's eq. 3 on ``(v - beta) / s``; d v_hat / d beta is 0 inside the range and 1 where
clipped; both are scaled by LSQ's g (the paper's choice; N and the ``grad_scale`` modes as in :mod:`quantizers.lsq`).
Built on LSQ's fused op: ``lsq(v - beta) + beta`` has exactly those gradients.

Conventions (recorded in ``options()``):
* offset: learned for activations, none for weights (``learn_offset=None``, the paper's symmetric weights);
  ``learn_offset=True`` / ``False`` forces it on / off for both roles.
* init (paper section 3.2): weights ``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``; activations min/max of
  the first batch, ``s = (max - min) / (Q_N + Q_P)`` and ``beta = min + Q_N s`` (so the codes span [min, max]);
  ``init="lsq"`` uses LSQ's rule with ``beta = 0`` instead. The paper's MSE activation init is not implemented.
* codes: quantbench's signed/unsigned ranges (LSQ's Q_N, Q_P); the paper's activations are unsigned with an offset,
  which is the unsigned case here. Sparsebit's LSQ+ (megvii-research/Sparsebit) was not consulted (departure: none
  known from the paper's equations).
* ``per_channel=True`` (weights): one step per output channel, as ``lsq`` (gradient-scale N per ``channel_n``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, check_choice
from .errors import QuantizerError
from .integer import IntegerSpec
from .kernels import lsq_quantize, lsq_quantize_per_channel
from .lsq import ACTIVATION_N, CHANNEL_N, GRAD_SCALES, PerChannelStep, channel_steps, check_bool, lsq_grad_scale
from .registry import register
from .ste import scale_grad

INITS = ("paper", "lsq")


@register("lsq_plus")
class LSQPlus(PerChannelStep, Quantizer):
    """LSQ+ (Bhalgat et al. 2020): learnable step and offset (activations), 3-sigma / min-max init."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        learn_offset: bool | None = None,
        init: str = "paper",
        grad_scale: str = "full",
        activation_n: str = "batch",
        min_step: float = 1e-8,
        per_channel: bool = False,
        channel_n: str = "channel",
    ) -> None:
        super().__init__(bits, signed, role)
        self.learn_offset = (self.role == "activation") if learn_offset is None else check_bool(
            "lsq_plus", "learn_offset", learn_offset)
        self.init = check_choice("lsq_plus", "init", init, INITS)
        self.grad_scale = check_choice("lsq_plus", "grad_scale", grad_scale, GRAD_SCALES)
        self.activation_n = check_choice("lsq_plus", "activation_n", activation_n, ACTIVATION_N)
        self.min_step = float(min_step)
        self.per_channel = check_bool("lsq_plus", "per_channel", per_channel) and self.role == "weight"
        self.channel_n = check_choice("lsq_plus", "channel_n", channel_n, CHANNEL_N)
        self.step_size = nn.Parameter(torch.tensor(1.0))
        if self.learn_offset:
            self.offset = nn.Parameter(torch.tensor(0.0))
        self.last_n: int | None = None

    # ---- operating point -----------------------------------------------------------------------------------------

    def initialize(self, v: Tensor) -> None:
        v = v.detach().float()
        if self.init == "lsq":
            if self.channels_of(v) is not None:
                self.resize_steps(channel_steps(v, self.qp))
                self.mark_initialized()
            else:
                super().initialize(v)
            return
        if self.learn_offset:
            low, high = float(v.min()), float(v.max())
            step = (high - low) / (self.qn + self.qp)
            step = step if math.isfinite(step) and step > self.min_step else self.min_step
            self.set_step(step)
            offset = low + self.qn * step
            with torch.no_grad():
                self.offset.fill_(offset if math.isfinite(offset) else 0.0)
            return
        if self.channels_of(v) is not None:
            flat = v.reshape(v.shape[0], -1)
            mean, std = flat.mean(dim=1), flat.std(dim=1, unbiased=False)
            steps = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs()) / 2 ** (self.bits - 1)
            steps = torch.where(torch.isfinite(steps) & (steps > self.min_step), steps, torch.full_like(steps, self.min_step))
            self.resize_steps(steps)
            self.mark_initialized()
            return
        mean, std = float(v.mean()), float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
        step = max(abs(mean - 3 * std), abs(mean + 3 * std)) / 2 ** (self.bits - 1)
        self.set_step(step if math.isfinite(step) and step > self.min_step else self.min_step)

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.step_size.fill_(step)
            if self.learn_offset:
                self.offset.fill_(0.0)

    def effective_step(self) -> Tensor:
        return self.step_size.abs().clamp_min(self.min_step)  # kept positive, as quantbench's LSQ

    # ---- forward -------------------------------------------------------------------------------------------------

    def quantize(self, v: Tensor) -> Tensor:
        self.last_n = self.gradient_n(v)
        g = lsq_grad_scale(self.grad_scale, self.last_n, self.qp)
        per_channel = self.steps_for(v) is not None
        quantize = lsq_quantize_per_channel if per_channel else lsq_quantize
        if not self.learn_offset:
            return quantize(v, self.effective_step(), self.qn, self.qp, g)
        # lsq(v - beta) + beta: d/d beta = 1 - (d lsq / d u) = 0 inside, 1 clipped; scaled by g like the step
        offset = scale_grad(self.offset, g).to(v.dtype)
        return quantize(v - offset, self.effective_step(), self.qn, self.qp, g) + offset

    # ---- interface -----------------------------------------------------------------------------------------------

    def levels(self) -> Tensor:
        step = self.effective_step().detach().reshape(-1, 1)
        codes = torch.arange(-self.qn, self.qp + 1, device=step.device, dtype=step.dtype)
        grid = codes * step + (self.offset.detach() if self.learn_offset else 0.0)
        return torch.unique(grid) if step.numel() > 1 else grid.reshape(-1)

    def current_step(self) -> float:
        return float(self.effective_step().detach().mean())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        parameters = {"step_size": self.step_size}
        if self.learn_offset:
            parameters["offset"] = self.offset
        return parameters

    def integer_spec(self) -> IntegerSpec:
        if not self.learn_offset:
            return self.step_spec(self.effective_step())
        if self.role == "weight":
            raise QuantizerError(
                "quantizer 'lsq_plus' with a learned weight offset has levels code * s + beta, not code * s: integer "
                "export needs learn_offset=false for weights"
            )
        # codes clamp(round((x - beta) / s)), value code * s + beta: the offset is a per-layer constant that the
        # integer layer cannot add after the matmul, so it is refused rather than silently dropped
        raise QuantizerError(
            "quantizer 'lsq_plus' activations carry a learned offset beta (value = code * s + beta); quantbench's "
            "integer layers have no zero-point yet, so train with learn_offset=false to export"
        )

    def conventions(self) -> dict[str, Any]:
        conventions: dict[str, Any] = {
            "boundary": "strict interior on unrounded (v - beta)/s (LSQ eq. 3, 5)",
            "offset_gradient": "0 inside, 1 clipped, times g",
            "weight_init": "max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)" if self.init == "paper" else "lsq",
            "activation_init": "min/max of the first batch" if self.init == "paper" else "lsq",
        }
        if self.per_channel:
            conventions["channel_axis"] = 0
        return conventions

