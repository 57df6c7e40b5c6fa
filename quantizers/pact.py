"""PACT (Choi et al. 2018): learnable activation clip alpha; weights quantized with DoReFa, as in the PACT paper.

* Unsigned activations: ``y = clip(x, 0, alpha)``, ``y_q = round(y * Q_P / alpha) * alpha / Q_P``. PACT's gradient:
  dy_q/dalpha = 1 for x >= alpha, else 0; alpha inside the step is *not* differentiated (``stop_gradient``), and
  dy_q/dx = 1 on 0 <= x < alpha. ``regularization()`` is PACT's ``alpha_l2 * alpha^2``.
* Signed tensors: ``weight_scheme="dorefa"`` (default for weights): ``2 * q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1``
  with k = bits, levels 2i/(2^k - 1) - 1 (no zero), gradient through tanh and the max as in tensorpack. quantbench
  multiplies the result by an output scale (a buffer, max|w| at init) so it is at the weights' scale; DoReFa's own
  output in [-1, 1] is ``output_scale="none"``. ``weight_scheme="symmetric"`` (default for signed *activations*, e.g.
  the image input): a symmetric clip [-alpha, alpha] with PACT's gradient (+1 above alpha, -1 below -alpha).
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerError, check_choice, check_step, lsq_init_step
from .integer import IntegerSpec, exact_float
from .kernels import dorefa_quantize, pact_quantize
from .registry import register

WEIGHT_SCHEMES = ("dorefa", "symmetric")
OUTPUT_SCALES = ("max", "none")


@register("pact")
class PACT(Quantizer):
    """PACT (Choi et al. 2018): learnable activation clip alpha with L2; DoReFa weights, as in the PACT paper."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str | None = None,
        init_alpha: float | None = None,
        alpha_l2: float = 1e-4,
        weight_scheme: str | None = None,
        output_scale: str = "max",
        detach_max: bool = False,
        min_alpha: float = 1e-8,
    ) -> None:
        super().__init__(bits, signed, role)
        weight_scheme = check_choice("pact", "weight_scheme", weight_scheme or ("dorefa" if self.role == "weight" else
                                                                                "symmetric"), WEIGHT_SCHEMES)
        check_choice("pact", "output_scale", output_scale, OUTPUT_SCALES)
        if init_alpha is not None:
            check_step(init_alpha)
        self.init_alpha = init_alpha
        self.alpha_l2 = float(alpha_l2)
        self.weight_scheme = weight_scheme  # applies to signed tensors; unsigned ones use the plain PACT clip
        self.output_scale = output_scale
        self.detach_max = bool(detach_max)
        self.min_alpha = float(min_alpha)
        self.dorefa = self.signed and weight_scheme == "dorefa"
        self.idempotent = not self.dorefa  # re-quantizing DoReFa's output warps it through tanh again
        # DoReFa levels are 2i/n - 1 with n = 2^k - 1 codes apart; a clip quantizer has Q_P steps from 0 to alpha.
        self.levels_span = self.qn + self.qp if self.dorefa else self.qp
        if self.dorefa:
            self.register_buffer("scale", torch.tensor(1.0))  # DoReFa output multiplier, not learned
        else:
            self.alpha = nn.Parameter(torch.tensor(1.0))

    # ---- operating point -----------------------------------------------------------------------------------------

    def initialize(self, v: Tensor) -> None:
        if self.dorefa:
            self.scale.fill_(max(float(v.abs().max()), 1e-8) if self.output_scale == "max" else 1.0)
            self.mark_initialized()
        elif self.init_alpha is not None:
            self.set_step(self.init_alpha / self.qp)  # a constant alpha (the PACT paper starts CIFAR at 10)
        else:
            self.set_step(lsq_init_step(v, self.qp))  # the LSQ operating point, so only the learning rule differs

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            if self.dorefa:
                # levels are scale * (2i/n - 1): spacing 2*scale/n
                self.scale.fill_(step * self.levels_span / 2 if self.output_scale == "max" else 1.0)
            else:
                self.alpha.fill_(step * self.qp)

    def effective_alpha(self) -> Tensor:
        return self.alpha.abs().clamp_min(self.min_alpha)

    # ---- forward -------------------------------------------------------------------------------------------------

    def quantize(self, v: Tensor) -> Tensor:
        if self.dorefa:
            return dorefa_quantize(v, self.scale, self.levels_span, self.detach_max)
        # clip to [0, alpha] ([-alpha, alpha] signed), Q_P steps of alpha / Q_P; alpha is not differentiated inside
        # the step, x == alpha belongs to the alpha branch (PACT eq. 3) and x = 0 to the identity branch
        return pact_quantize(v, self.effective_alpha(), self.qp, self.signed)

    # ---- interface -----------------------------------------------------------------------------------------------

    def levels(self) -> Tensor:
        if self.dorefa:
            i = torch.arange(self.levels_span + 1, dtype=self.scale.dtype, device=self.scale.device)
            return (2 * i / self.levels_span - 1) * self.scale
        alpha = self.effective_alpha().detach()
        low = -self.qp if self.signed else 0
        return torch.arange(low, self.qp + 1, dtype=alpha.dtype, device=alpha.device) * (alpha / self.qp)

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {} if self.dorefa else {"alpha": self.alpha}

    def regularization(self) -> Tensor:
        if self.dorefa:
            return torch.zeros((), device=self.scale.device)
        return self.alpha_l2 * self.alpha**2

    def integer_spec(self) -> IntegerSpec:
        if self.dorefa:
            if self.role == "activation":
                raise QuantizerError(
                    "quantizer 'pact' uses DoReFa on activations: its codes depend on each batch's max|tanh x|, so "
                    "there is no fixed integer requantizer; use weight_scheme=symmetric for signed activations"
                )
            n = self.levels_span  # levels scale * (2i/n - 1) = (2i - n) * scale/n: odd codes in [-n, n]
            return IntegerSpec(exact_float(self.scale) / n, -n, n, stride=2)
        step = exact_float(self.effective_alpha().detach() / self.qp)  # the float32 step the fake quantizer divides by
        return IntegerSpec(step, -self.qp if self.signed else 0, self.qp, width=step)
