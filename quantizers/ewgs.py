"""EWGS: Element-Wise Gradient Scaling (Lee, Kim, Ham, CVPR 2021, "Network quantization with element-wise gradient
scaling").

Canonical code: cvlab-yonsei/EWGS ImageNet/custom_modules.py. A learnable interval (l, u) normalizes the input,
``x_n = clamp((v - l) / (u - l), 0, 1)``; the discretizer gives ``x_q = round(x_n (L - 1)) / (L - 1)`` (L = 2^b
levels); weights output ``2 x_q - 1``, activations ``x_q``. The discretizer's
backward scales each element's gradient by the sign of its upstream gradient and its rounding error:
``g_in = g (1 + delta sign(g) (x_n - x_q))`` (delta = 0 is the plain STE). Everything else (the clamp, (l, u)) is
differentiated by autograd.

That gradient is not the derivative of one surrogate function: for a fixed upstream gradient G it is the derivative of
``G x_n + (delta / 2) |G| (x_n - x_q0)^2`` with x_q0 frozen. :func:`ewgs_discretize` therefore builds, under a
surrogate tape, the surrogate with the sign of the upstream gradient as a frozen piece that a backward pass fills in,
and the class declares ``upstream_dependent_gradient = True``: the conformance kit then records its surrogate with
one backward pass of the same loss before comparing autograd with finite differences.

Conventions (recorded in ``options()``), where quantbench departs from the code:
* delta: a fixed hyper-parameter (``delta``, default 1e-3, both roles); the released code starts at 0 and updates it
  every 10 iterations from a Hessian-trace estimate, which quantbench does not implement.
* output scale: the code multiplies each conv output by a learned per-layer scale; quantbench's default
  ``output_scale="interval"`` multiplies the quantizer's output by the interval held constant in backward, ``(u - l)
  / 2`` for ``2 x_q - 1`` and ``u - l`` for ``x_q``, so outputs are at the input's scale (BatchNorm absorbs the rest);
  ``output_scale="normalized"`` is the code's raw output. Signed activations (the image input; the code has none)
  output ``l + x_q (u - l)``, at their own place.
* init: the code's, weights ``u = 3 std, l = -3 std``; activations ``u = 3 std / sqrt(1 - 2/pi)``, ``l = min``.
  After a ReLU that puts every zero exactly on the interval's lower end: the authors' torch (clamp gradient 1 at the
  bound, before torch 2.14) pushed those zeros' gradient into ``l``; quantbench (strict interior) pushes none.
* interval gradients: the code trains (l, u) with their own optimizer; quantbench trains every quantizer with one
  SGD recipe, where the raw interval gradient (a sum over the whole tensor) collapses the interval within a few
  steps, so by default it is scaled by LSQ's g = 1/sqrt(N Q_P) (``grad_scale="full"``); ``"none"`` is the code's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerError, check_choice
from .integer import IntegerSpec, exact_float
from .lsq import GRAD_SCALES, lsq_grad_scale
from .registry import register
from .kernels.ewgs import ewgs_quantize
from .ste import scale_grad, stop_gradient

OUTPUT_SCALES = ("interval", "normalized")


@register("ewgs")
class EWGS(Quantizer):
    """Element-wise gradient scaling (EWGS, Lee et al. 2021): learned interval, sign-dependent gradient scaling."""

    #: the backward depends on the upstream gradient's sign (see module docstring; used by the conformance kit)
    upstream_dependent_gradient = True

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        delta: float = 1e-3,
        output_scale: str = "interval",
        grad_scale: str = "full",
        min_width: float = 1e-8,
    ) -> None:
        super().__init__(bits, signed, role)
        if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
            raise QuantizerError(f"ewgs delta must be a finite number >= 0 (0 is the plain STE), got {delta!r}")
        self.delta = float(delta)
        self.output_scale = check_choice("ewgs", "output_scale", output_scale, OUTPUT_SCALES)
        self.grad_scale = check_choice("ewgs", "grad_scale", grad_scale, GRAD_SCALES)
        self.min_width = float(min_width)
        self.steps = 2**bits - 1  # L - 1
        self.centered = self.role == "weight"  # 2 x_q - 1 (weights) or x_q (activations)
        # signed activations (the image input) are returned at their own place: l + x_q (u - l), not shifted to 0
        self.shifted = self.signed and not self.centered
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))

    # ---- operating point -----------------------------------------------------------------------------------------

    def initialize(self, v: Tensor) -> None:
        v = v.detach().float()
        std = float(v.std()) if v.numel() > 1 else float(v.abs().mean())
        std = std if math.isfinite(std) else 1.0
        if self.role == "weight":
            lower, upper = -3 * std, 3 * std
        else:
            lower = float(v.min()) if math.isfinite(float(v.min())) else 0.0
            upper = 3 * std / math.sqrt(1 - 2 / math.pi)
        if not upper - lower > self.min_width:  # constant data: any non-empty interval around it
            upper = lower + max(abs(lower), 1.0)
        with torch.no_grad():
            self.lower.fill_(lower)
            self.upper.fill_(upper)
        self.mark_initialized()

    def apply_step(self, step: float) -> None:
        width = step * self.steps
        with torch.no_grad():
            self.lower.fill_(-width / 2 if self.centered else 0.0)
            self.upper.fill_(width / 2 if self.centered else width)

    def width(self, lower: Tensor | None = None, upper: Tensor | None = None) -> Tensor:
        lower = self.lower if lower is None else lower
        upper = self.upper if upper is None else upper
        return (upper - lower).clamp_min(self.min_width)

    # ---- forward -------------------------------------------------------------------------------------------------

    def quantize(self, v: Tensor) -> Tensor:
        g = lsq_grad_scale(self.grad_scale, self.gradient_count(v), self.steps)
        lower, upper = scale_grad(self.lower, g), scale_grad(self.upper, g)
        width = self.width(lower, upper)
        # output scale "interval": the interval held constant, so (l, u) get EWGS's gradients through x_n only
        if self.output_scale == "interval":
            held = stop_gradient(width)
            multiplier = held / 2 if self.centered else held
        else:
            multiplier = torch.ones((), dtype=width.dtype, device=width.device)
        shift = stop_gradient(self.lower) if self.shifted and self.output_scale == "interval" else torch.zeros_like(multiplier)
        dtype = v.dtype  # the fused op (one pass each way); its reference: clamp, the discretizer, the output scale
        return ewgs_quantize(v, lower.to(dtype), width.to(dtype), multiplier.to(dtype), shift.to(dtype), self.steps,
                             self.delta, self.centered).to(v.dtype)

    # ---- interface -----------------------------------------------------------------------------------------------

    def output_multiplier(self) -> Tensor:
        if self.output_scale == "normalized":
            return torch.ones((), dtype=self.upper.dtype)
        width = self.width().detach()
        return width / 2 if self.centered else width

    def levels(self) -> Tensor:
        codes = torch.arange(self.steps + 1, dtype=self.upper.dtype, device=self.upper.device) / self.steps
        unit = 2 * codes - 1 if self.centered else codes
        shift = self.lower.detach() if self.shifted and self.output_scale == "interval" else 0.0
        return unit * self.output_multiplier() + shift

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {"upper": self.upper, "lower": self.lower}

    def integer_spec(self) -> IntegerSpec:
        if self.role == "weight":
            return super().integer_spec()  # 2 x_q - 1: a uniform grid offset by half a step (odd codes)
        if self.signed:
            raise QuantizerError(
                "quantizer 'ewgs' signed activations output l + code * step (an offset grid): quantbench's integer "
                "layers have no zero-point; keep the first layer in full precision or use another quantizer for it"
            )
        width = exact_float(self.width())
        multiplier = exact_float(self.output_multiplier())
        # codes clamp(round(((x - l) / (u - l)) * (L - 1)), 0, L - 1); value code * multiplier / (L - 1)
        return IntegerSpec(multiplier / self.steps, 0, self.steps, offset=exact_float(self.lower.detach()),
                           width=width, multiplier=float(self.steps))

    def conventions(self) -> dict[str, Any]:
        return {
            "gradient": "g (1 + delta sign(g) (x_n - x_q)) at the discretizer",
            "delta_rule": "fixed (no Hessian-trace update)",
            "output": ("2 x_q - 1" if self.centered else "x_q") + (" times the interval" if self.output_scale ==
                                                                  "interval" else ""),
        }
