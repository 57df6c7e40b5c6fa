"""DoReFa-Net (Zhou, Wu, Ni, Zhou, He, Zou, 2016, "DoReFa-Net: Training low bitwidth convolutional neural networks with
low bitwidth gradients"), weights and activations: the classic baseline that learns nothing in the quantizer.

* Weights (signed tensors with ``role="weight"``): ``2 q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` with
  ``q_k(x) = round((2^k - 1) x) / (2^k - 1)``, gradient through tanh and the max (tensorpack's code, the canonical
  implementation), times an output scale (a buffer, max|w| at init) so weights stay at their scale; the same op as
  PACT's DoReFa weights (:func:`quantizers.kernels.dorefa_quantize`). ``output_scale="none"`` is DoReFa's [-1, 1].
* Activations: ``a_q = q_k(clip(a, 0, c))`` with ``c = 1`` (the paper's clip, ``activation_clip``), straight-through
  on [0, c); signed activations (the image input) clip symmetrically to [-c, c] with Q_P levels each side. This is
  PACT's op with a constant alpha, so it runs on the fused kernel. Boundary: a value exactly at the clip point
  gets no input gradient (PACT's convention; torch's clamp, used by tensorpack, passes gradient 1 there).
* ``set_step(s)`` places the activation clip at ``Q_P s`` and the weight output scale so that the weight grid step is
  ``s``; data-driven init leaves the activation clip at ``activation_clip`` (the paper's fixed range).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Quantizer, QuantizerError, check_choice, check_step
from .integer import IntegerSpec, exact_float
from .kernels import dorefa_quantize, pact_quantize
from .registry import register

OUTPUT_SCALES = ("max", "none")


@register("dorefa")
class DoReFa(Quantizer):
    """DoReFa-Net (Zhou et al. 2016): tanh/max-normalized weights and clip(a, 0, 1) activations, nothing learned."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        activation_clip: float = 1.0,
        output_scale: str = "max",
        detach_max: bool = False,
    ) -> None:
        super().__init__(bits, signed, role)
        self.activation_clip = check_step(activation_clip)
        self.output_scale = check_choice("dorefa", "output_scale", output_scale, OUTPUT_SCALES)
        self.detach_max = bool(detach_max)
        self.weights = self.role == "weight"
        self.idempotent = not self.weights  # re-quantizing DoReFa weights warps them through tanh again
        self.levels_span = self.qn + self.qp if self.weights else self.qp
        # weights: DoReFa's output multiplier; activations: the clip point c (a buffer: DoReFa learns nothing)
        self.register_buffer("scale", torch.tensor(1.0 if self.weights else self.activation_clip))

    def initialize(self, v: Tensor) -> None:
        if self.weights and self.output_scale == "max":
            self.scale.fill_(max(float(v.abs().max()), 1e-8) if torch.isfinite(v.abs().max()) else 1.0)
        self.mark_initialized()

    def apply_step(self, step: float) -> None:
        if self.weights:
            # levels scale * (2i/n - 1): spacing 2 scale / n
            self.scale.fill_(step * self.levels_span / 2 if self.output_scale == "max" else 1.0)
        else:
            self.scale.fill_(step * self.qp)

    def quantize(self, v: Tensor) -> Tensor:
        if self.weights:
            return dorefa_quantize(v, self.scale, self.levels_span, self.detach_max)
        return pact_quantize(v, self.scale, self.qp, self.signed)

    def levels(self) -> Tensor:
        if self.weights:
            i = torch.arange(self.levels_span + 1, dtype=self.scale.dtype, device=self.scale.device)
            return (2 * i / self.levels_span - 1) * self.scale
        low = -self.qp if self.signed else 0
        return torch.arange(low, self.qp + 1, dtype=self.scale.dtype, device=self.scale.device) * (self.scale / self.qp)

    def range_parameters(self) -> dict:
        return {}  # nothing is learned

    def integer_spec(self) -> IntegerSpec:
        if self.weights:
            n = self.levels_span  # odd codes 2i - n in [-n, n] times scale / n, as PACT's DoReFa weights
            return IntegerSpec(exact_float(self.scale) / n, -n, n, stride=2)
        if self.scale.dim() != 0:
            raise QuantizerError("quantizer 'dorefa' activation clip must be one number")
        step = exact_float(self.scale / self.qp)  # the float32 step the fused op divides by
        return IntegerSpec(step, -self.qp if self.signed else 0, self.qp, width=step)

    def conventions(self) -> dict[str, Any]:
        if self.weights:
            return {"weights": "2 q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1, gradient through tanh and max"}
        return {"activations": "q_k(clip(a, 0, c))" + (" (symmetric for signed)" if self.signed else ""),
                "boundary": "no input gradient at a == c (PACT's)"}
