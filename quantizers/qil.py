"""QIL: Quantization-Interval Learning (Jung et al., CVPR 2019), spec section 2.

A transformer maps the interval (c - d, c + d] (center c, half-width d; on |w| for signed tensors) linearly onto
(0, 1], with a learnable exponent gamma for weights: ``x_hat = ((|v| - (c - d)) / (2d))^gamma * sign(v)``, 0 at or
below the pruning point c - d, +-1 above the clipping point c + d. Boundary (quantbench's choice, as the code does
it): the pruning point itself is **pruned** (no gradient there) and the clipping point is **interior** (it gets the
transformer's gradient); the paper's eq. 5 writes both end points into the interior, and the outputs are the same
either way (0 and 1), only the gradient at exactly c - d differs. The discretizer rounds ``x_hat * q`` (q = Q_P: 2^(b-1) - 1
signed, 2^b - 1 unsigned) with a straight-through gradient; the transformer is differentiated exactly, so pruned and
clipped values get no gradient.

Output scale (the choice quantbench makes explicit): published QIL feeds the normalized ``x_bar`` in [-1, 1] / [0, 1]
to the layer and lets BatchNorm absorb the scale (``output_scale="normalized"``). quantbench's default ``"clip"``
multiplies ``x_bar`` by the clipping point c + d held constant in backward, so the output is at v's scale (a drop-in
replacement in pre-activation residual blocks) and c, d, gamma receive QIL's own gradients times that constant.
Init: ``set_step(s)`` puts c = d = q*s/2 and gamma = 1, exactly the decision thresholds of a uniform quantizer with
step s; the data-driven init uses LSQ's step, so QIL starts from LSQ's forward function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerError, check_choice
from .integer import IntegerSpec, exact_float
from .kernels import qil_quantize
from .registry import register

OUTPUT_SCALES = ("clip", "normalized")


@register("qil")
class QIL(Quantizer):
    """Quantization-interval learning (QIL, Jung et al. 2019): learnable center/width (and gamma for weights)."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        output_scale: str = "clip",
        learn_gamma: bool = True,
        min_distance: float = 1e-8,
    ) -> None:
        super().__init__(bits, signed, role)
        self.output_scale = check_choice("qil", "output_scale", output_scale, OUTPUT_SCALES)
        self.learn_gamma = bool(learn_gamma) and self.role == "weight"  # the paper's activations have no gamma
        self.min_distance = float(min_distance)
        self.q = self.qp
        self.distance = nn.Parameter(torch.tensor(0.5))
        self.center = nn.Parameter(torch.tensor(0.5))
        if self.learn_gamma:
            self.gamma = nn.Parameter(torch.tensor(1.0))

    def apply_step(self, step: float) -> None:
        half_width = step * self.q / 2
        with torch.no_grad():
            self.center.fill_(half_width)
            self.distance.fill_(half_width)
            if self.learn_gamma:
                self.gamma.fill_(1.0)

    def interval(self) -> tuple[Tensor, Tensor, Tensor]:
        """(pruning point, clipping point, half-width), with the half-width kept positive."""
        distance = self.distance.abs().clamp_min(self.min_distance)
        return self.center - distance, self.center + distance, distance

    def quantize(self, v: Tensor) -> Tensor:
        prune, clip, distance = self.interval()
        # Interval (c - d, c + d]: c - d itself is pruned, c + d interior; gamma only for weights (kept >= 1e-3);
        # the output scale (the clipping point) is held constant in backward.
        gamma = self.gamma.abs().clamp_min(1e-3) if self.learn_gamma else None
        out_scale = clip.clamp_min(self.min_distance) if self.output_scale == "clip" else None
        return qil_quantize(v, prune, clip, distance, gamma, self.q, self.signed, out_scale)

    def levels(self) -> Tensor:
        low = -self.q if self.signed else 0
        codes = torch.arange(low, self.q + 1, dtype=self.center.dtype, device=self.center.device) / self.q
        if self.output_scale == "clip":
            codes = codes * self.interval()[1].detach().clamp_min(self.min_distance)
        return codes

    def range_parameters(self) -> dict[str, nn.Parameter]:
        # distance first: LSQ's Figure 2 differentiates QIL by its width with the center held fixed.
        parameters = {"distance": self.distance, "center": self.center}
        if self.learn_gamma:
            parameters["gamma"] = self.gamma
        return parameters

    def integer_spec(self) -> IntegerSpec:
        prune, clip, distance = (t.detach() for t in self.interval())
        scale = exact_float(clip.clamp_min(self.min_distance)) if self.output_scale == "clip" else 1.0
        low = -self.q if self.signed else 0
        if self.role == "weight":
            # weight codes are precomputed from the quantizer's own output: the output grid k / q * scale is uniform
            # for any gamma, only which weights land on which level depends on it
            return IntegerSpec(scale / self.q, low, self.q)
        if self.learn_gamma:
            raise QuantizerError(
                "quantizer 'qil' applies a learned exponent gamma to activations: x -> codes is then nonlinear and has "
                "no integer requantizer (QIL's activations have no gamma; only weights do)"
            )
        return IntegerSpec(scale / self.q, low, self.q, offset=exact_float(prune), width=exact_float(2 * distance),
                           multiplier=float(self.q), magnitude=self.signed)
