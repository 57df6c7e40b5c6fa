"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020), equations 1-3 and 5.

Conventions (recorded by ``options()``):
* boundaries: the paper's, a strict interior on the unrounded v/s; at v/s = Q_P exactly the step gradient is Q_P and
  the input gradient 0 (PyTorch's fused kernel calls values that *round* into range "inside" instead);
* gradient scale g: ``full`` = 1/sqrt(N * Q_P) (paper), ``numel`` = 1/sqrt(N), ``none`` = 1, times ``grad_scale_mult``;
* N: the weight tensor's numel for weights; for activations the paper's "number of features" is undefined, so
  ``activation_n="batch"`` (numel of the batch tensor, as lsq-net / MQBench / torch.ao) or ``"sample"`` (per sample).
* ``per_channel=True`` (weights only; ignored for activations, and recorded as False there): one step per output
  channel (axis 0), each initialized by the paper's rule on its own channel, ``2 mean|w_c| / sqrt(Q_P)``. N for the
  gradient scale: ``channel_n="channel"`` (default) uses the numel of one channel, numel / C, the number of terms
  summed into that channel's step gradient, so each step sees the gradient scale a layer of that size would;
  ``"tensor"`` uses the whole tensor's numel (lsq-net, torch.ao). A tensor of fewer than two dimensions has one
  channel. ``set_step`` places every channel at the same step. Per-channel steps run eager bodies (the fused
  kernels take one scalar step); integer and ONNX export take them as one step per output channel
  (``IntegerSpec.step`` a list, ONNX's per-axis DequantizeLinear).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, check_choice
from .integer import IntegerSpec, exact_steps
from .errors import QuantizerError
from .kernels import lsq_quantize, lsq_quantize_per_channel
from .registry import register

GRAD_SCALES = ("full", "numel", "none")
ACTIVATION_N = ("batch", "sample")
CHANNEL_N = ("channel", "tensor")
_BOOLEAN_WORDS = {"true": True, "false": False}


def check_bool(quantizer: str, option: str, value: Any) -> bool:
    """A boolean option given as a bool or as the words true/false (``--set lsq.per_channel=true``)."""
    if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[value.strip().lower()]
    return bool(check_choice(quantizer, option, value, (False, True)))


def lsq_grad_scale(mode: str, n: int, qp: int, multiplier: float = 1.0) -> float:
    """LSQ's step-gradient scale g for ``n`` elements: full 1/sqrt(N*Qp), numel 1/sqrt(N), none 1; times multiplier."""
    if mode == "full":
        return multiplier / math.sqrt(n * qp)
    if mode == "numel":
        return multiplier / math.sqrt(n)
    return multiplier


def channel_steps(v: Tensor, qp: int, eps: float = 1e-8) -> Tensor:
    """LSQ's init rule per output channel (axis 0): ``2 mean|v_c| / sqrt(Q_P)``, floored at ``eps``."""
    flat = v.detach().float().reshape(v.shape[0], -1)
    steps = 2.0 * flat.abs().mean(dim=1) / math.sqrt(qp)
    return torch.where(torch.isfinite(steps) & (steps > eps), steps, torch.full_like(steps, eps))


class PerChannelStep:
    """Mixin for a quantizer whose ``step_size`` (parameter or buffer) may hold one step per output channel.

    The step starts 0-d; it takes the channel count of the first weight it sees (resized in place, so an optimizer
    built before the first forward keeps the same parameter) and the shape of a loaded state_dict.
    """

    step_size: Tensor
    per_channel: bool
    activation_n: str  # LSQ-family options read by gradient_n (fixed, which learns nothing, never calls it)
    channel_n: str

    def gradient_n(self, v: Tensor) -> int:
        """N in g = 1/sqrt(N*Qp): the number of terms summed into this step's gradient (see module docstring);
        reads the LSQ-family options ``activation_n`` and ``channel_n``."""
        if self.role == "activation" and self.activation_n == "sample" and v.dim() > 1:
            return max(1, v.numel() // v.shape[0])
        channels = self.channels_of(v)
        if channels and self.channel_n == "channel":
            return max(1, v.numel() // channels)
        return self.gradient_count(v)  # activations: the global batch under torch.distributed

    def channels_of(self, v: Tensor) -> int | None:
        """The channel count to use for ``v``: axis 0 for a per-channel quantizer and a tensor of 2+ dimensions."""
        return int(v.shape[0]) if self.per_channel and v.dim() >= 2 else None

    def resize_steps(self, values: Tensor) -> None:
        with torch.no_grad():
            self.step_size.data = values.to(self.step_size.dtype).to(self.step_size.device).reshape(-1).clone()

    def steps_for(self, v: Tensor) -> Tensor | None:
        """The per-channel steps for ``v`` (expanding a uniform step placed by ``set_step``), or None if per tensor."""
        channels = self.channels_of(v)
        if channels is None:
            if self.step_size.dim() != 0:
                raise QuantizerError(
                    f"this per-channel quantizer has {self.step_size.numel()} channel steps but got a tensor of shape "
                    f"{tuple(v.shape)}; give it the weight tensor it was initialized on"
                )
            return None
        if self.step_size.dim() == 0:
            self.resize_steps(self.step_size.detach().expand(channels))
        if self.step_size.numel() != channels:
            raise QuantizerError(
                f"this per-channel quantizer has {self.step_size.numel()} channel steps but the tensor has {channels} "
                "output channels (axis 0); use one quantizer per layer"
            )
        return self.step_size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved = state_dict.get(prefix + "step_size")
        if saved is not None and saved.shape != self.step_size.shape:
            self.resize_steps(torch.zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def step_spec(self, step: Tensor) -> IntegerSpec:
        """Codes ``clamp(round(v/s), -Q_N, Q_P)``, value ``code * s``: one step (with its requantizer, width s), or
        per channel one step per output channel (weights only, so no requantizer)."""
        steps = exact_steps(step)  # the float32 steps the forward divides by, exact in float64
        width = None if isinstance(steps, list) else steps
        return IntegerSpec(steps, -self.qn, self.qp, width=width)  # type: ignore[attr-defined]


@register("lsq")
class LSQ(PerChannelStep, Quantizer):
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
        per_channel: bool = False,
        channel_n: str = "channel",
    ) -> None:
        super().__init__(bits, signed, role)
        self.grad_scale = check_choice("lsq", "grad_scale", grad_scale, GRAD_SCALES)
        self.grad_scale_mult = float(grad_scale_mult)
        self.activation_n = check_choice("lsq", "activation_n", activation_n, ACTIVATION_N)
        self.min_step = float(min_step)
        # per-channel steps are a weight convention (every deployment toolkit's); activations keep one step
        self.per_channel = check_bool("lsq", "per_channel", per_channel) and self.role == "weight"
        self.channel_n = check_choice("lsq", "channel_n", channel_n, CHANNEL_N)
        self.step_size = nn.Parameter(torch.tensor(1.0))
        #: N used for the gradient scale on the latest forward (reported in layer tables)
        self.last_n: int | None = None

    def initialize(self, v: Tensor) -> None:
        if self.channels_of(v) is None:
            super().initialize(v)
            return
        self.resize_steps(channel_steps(v, self.qp))
        self.mark_initialized()

    def effective_step(self) -> Tensor:
        # Kept positive (the paper has no guard; negative steps are a known failure of copies without one).
        return self.step_size.abs().clamp_min(self.min_step)

    def quantize(self, v: Tensor) -> Tensor:
        self.last_n = self.gradient_n(v)
        g = lsq_grad_scale(self.grad_scale, self.last_n, self.qp, self.grad_scale_mult)
        if self.steps_for(v) is not None:
            return lsq_quantize_per_channel(v, self.effective_step(), self.qn, self.qp, g)
        return lsq_quantize(v, self.effective_step(), self.qn, self.qp, g)

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.step_size.fill_(step)

    def levels(self) -> Tensor:
        # per channel: every channel's grid, merged (the values the whole tensor can take)
        step = self.effective_step().detach().reshape(-1, 1)
        codes = torch.arange(-self.qn, self.qp + 1, device=step.device, dtype=step.dtype)
        return torch.unique(codes * step) if step.numel() > 1 else (codes * step).reshape(-1)

    def current_step(self) -> float:
        """The step; per channel, the mean of the channels' steps (for layer tables)."""
        return float(self.effective_step().detach().mean())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {"step_size": self.step_size}

    def integer_spec(self) -> IntegerSpec:
        return self.step_spec(self.effective_step())

    def conventions(self) -> dict[str, Any]:
        conventions: dict[str, Any] = {"boundary": "strict interior on unrounded v/s (paper eq. 3, 5)"}
        if self.per_channel:
            conventions["channel_axis"] = 0
        return conventions
