"""N2UQ: Nonuniform-to-Uniform Quantization (Liu, Cheng, Zhou, Fei, Shen, Luo, Wang, CVPR 2022, "Nonuniform-to-
uniform quantization: towards accurate quantization via generalized straight-through estimation").

Activations (canonical code: liuzechun/Nonuniform-to-Uniform-Quantization resnet/resnet.py, ``LTQ``): learnable cell
widths ``a_0..a_{n-1}`` (n = 2^b - 1) from a learnable ``start`` give the input cells ``[T_i, T_{i+1})``,
``T_i = start + a_0 + ... + a_{i-1}``; the output is uniform, ``(lo + code) * out_step`` with ``code`` the number of
forward thresholds (the cell midpoints ``T_i + a_i / 2``) that ``x`` exceeds. Backward is the generalized STE: the
derivative of the piecewise-linear ``p(x) = lo + i + (x - T_i) / a_i`` in cell i (constant outside [T_0, T_n]), which
also gives ``start`` and the widths their gradients; ``out_step`` gets the forward code (``out_step * (p +
stop_gradient(code - p))``). Widths are floored at ``min_width`` (the code floors at 1e-3).

Weights (the code's ``HardQuantizeConv``): per output channel ``sf = gamma * mean|w_c|`` with ``gamma = (2^b - 1) /
2^(b-1)`` (held constant), ``w_hat = sf * (2 round((clip(w / sf, -1, 1) + 1) n / 2) / n - 1)``, n = 2^b - 1 (levels
without zero, like DoReFa), gradient straight-through, unclipped.

Conventions (recorded in ``options()``), where quantbench departs from the code:
* the code's input scale ``scale1`` is dropped (redundant with the thresholds, which live in input units here) and
  its output scale ``scale2 * 2 / n`` is the one parameter ``out_step``;
* signed activations (the image input) use codes ``-Q_N..Q_P``; the code only has unsigned ones;
* init: ``init="lsq"`` (default) places start, widths and out_step at LSQ's initial step, so N2UQ starts from LSQ's
  forward; ``init="code"``: start 0, widths 2/n, out_step 2/n (the code's range [0, 2]);
* weights: the code's gradient is ``1 / sf`` per channel (it passes the gradient of ``w / sf``); quantbench passes 1,
  so a weight's learning rate means the same as for every other quantizer; the weight clip (the code's
  ``clip_val = 2``, which never receives a gradient) is the constant 1 in units of sf. A tensor of fewer than two
  dimensions is one channel.
* integer export: refused for activations (non-uniform input thresholds need comparisons, not quantbench's
  requantizer); weights export as odd codes ``2i - n`` in ``[-n, n]`` (stride 2) times ``sf_c / n``, one step per
  output channel, from the scale of the latest forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerError, check_choice, lsq_init_step
from .integer import IntegerSpec
from .kernels.n2uq import n2uq_quantize
from .registry import register
from .ste import active_tape, stop_gradient

INITS = ("lsq", "code")


class _ForwardAs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, surrogate: Tensor) -> Tensor:  # type: ignore[override]
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return None, grad


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` exactly in the forward pass (no float error from ``surrogate + (value - surrogate)``), with the
    gradient of ``surrogate``: the generalized straight-through estimator (``round_ste(x)`` is
    ``straight_through(round(x), x)``). Under a surrogate tape: ``surrogate + frozen(value - surrogate)``."""
    tape = active_tape()
    if tape is None:
        return _ForwardAs.apply(value.detach(), surrogate)
    return surrogate + tape.freeze(value - surrogate)


@register("n2uq")
class N2UQ(Quantizer):
    """Nonuniform-to-uniform (N2UQ, Liu et al. 2022): learned input thresholds, uniform outputs, generalized STE."""

    def __init__(
        self, bits: int, signed: bool, role: str | None = None, init: str = "lsq", min_width: float = 1e-8
    ) -> None:
        super().__init__(bits, signed, role)
        self.init = check_choice("n2uq", "init", init, INITS)
        self.min_width = float(min_width)
        self.cells = self.qn + self.qp  # 2^b - 1 cells, 2^b output codes
        self.lowest = -self.qn
        self.weights = self.role == "weight"
        self.idempotent = not self.weights  # the weight scale is recomputed from the (re-quantized) weights
        if self.weights:
            self.gamma = (2**bits - 1) / 2 ** (bits - 1)
            # the latest per-channel scale sf, for levels(): weights' levels follow the weights themselves
            self.register_buffer("last_scale", torch.tensor(1.0), persistent=False)
        else:
            self.start = nn.Parameter(torch.tensor(0.0))
            self.widths = nn.Parameter(torch.ones(self.cells))
            self.out_step = nn.Parameter(torch.tensor(1.0))

    # ---- operating point -----------------------------------------------------------------------------------------

    def initialize(self, v: Tensor) -> None:
        if self.weights:
            self.mark_initialized()  # the scale is recomputed from the weights on every forward
        elif self.init == "code":
            self.place(start=0.0, width=2.0 / self.cells, out_step=2.0 / self.cells)
            self.mark_initialized()
        else:
            self.set_step(lsq_init_step(v, self.qp))

    def apply_step(self, step: float) -> None:
        if not self.weights:  # weights have no state: their scale comes from the weights
            self.place(start=self.lowest * step, width=step, out_step=step)

    def place(self, start: float, width: float, out_step: float) -> None:
        with torch.no_grad():
            self.start.fill_(start)
            self.widths.fill_(width)
            self.out_step.fill_(out_step)

    # ---- forward -------------------------------------------------------------------------------------------------

    def quantize(self, v: Tensor) -> Tensor:
        return self.quantize_weight(v) if self.weights else self.quantize_activation(v)

    def channel_scale(self, w: Tensor) -> Tensor:
        """sf = gamma * mean|w_c| per output channel (axis 0; the whole tensor below two dimensions), held constant."""
        magnitude = w.detach().abs()
        mean = magnitude.flatten(1).mean(dim=1).reshape((-1,) + (1,) * (w.dim() - 1)) if w.dim() >= 2 else magnitude.mean()
        return stop_gradient((self.gamma * mean).clamp_min(1e-12))

    def quantize_weight(self, w: Tensor) -> Tensor:
        scale = self.channel_scale(w)
        self.last_scale = scale.detach().reshape(-1).float()
        n = self.cells
        unit = torch.clamp(w.detach() / scale, -1.0, 1.0)
        quantized = scale * (2 * torch.round((unit + 1) * n / 2) / n - 1)
        return straight_through(quantized, w).to(w.dtype)  # straight-through, unclipped

    def floored_widths(self) -> Tensor:
        """The cell widths, floored at ``min_width``."""
        return torch.where(self.widths > self.min_width, self.widths, torch.full_like(self.widths, self.min_width))

    def edges(self) -> tuple[Tensor, Tensor]:
        """(T_0..T_n, the floored widths): start, then start plus the cumulative widths."""
        widths = self.floored_widths()
        return torch.cat([self.start.reshape(1), self.start + torch.cumsum(widths, 0)]), widths

    def quantize_activation(self, x: Tensor) -> Tensor:
        # the fused op (native C kernels or comparison chains, one pass each way); its reference is the composite with
        # bucketize / gathers. The op builds the edges itself: only the floored widths here.
        widths = self.floored_widths()
        return n2uq_quantize(x, self.start.to(x.dtype), widths.to(x.dtype), self.out_step.to(x.dtype), self.lowest)

    # ---- interface -----------------------------------------------------------------------------------------------

    def levels(self) -> Tensor:
        # built on the state's device: a CPU grid times a CUDA parameter would fail at the first layer table
        device = self.last_scale.device if self.weights else self.out_step.device
        codes = torch.arange(self.lowest, self.lowest + self.cells + 1, dtype=torch.float64, device=device)
        if self.weights:
            unit = 2 * torch.arange(self.cells + 1, dtype=torch.float64, device=device) / self.cells - 1
            scales = self.last_scale.double().reshape(-1, 1)
            return torch.unique((unit * scales).reshape(-1)).to(self.last_scale.dtype)
        return codes.to(self.out_step.dtype) * self.out_step.detach().abs()

    def current_step(self) -> float:
        if self.weights:
            return float(2 * self.last_scale.mean() / self.cells)
        return float(self.out_step.detach().abs())

    def range_parameters(self) -> dict[str, nn.Parameter]:
        if self.weights:
            return {}
        return {"widths": self.widths, "start": self.start, "out_step": self.out_step}

    def integer_spec(self) -> IntegerSpec:
        if not self.weights:
            raise QuantizerError(
                "quantizer 'n2uq' activations have learned non-uniform input thresholds: they need threshold "
                "comparisons, which quantbench's integer requantizer (round of a scaled input) cannot express"
            )
        if self.last_scale.numel() > 1:
            # levels sf_c (2i/n - 1): the odd codes 2i - n in [-n, n] times sf_c / n per output channel (as DoReFa's,
            # one unit per channel); sf is the latest forward's, so call it on the weights first (export does)
            n = self.cells
            return IntegerSpec([value / n for value in self.last_scale.double().tolist()], -n, n, stride=2)
        return super().integer_spec()

    def conventions(self) -> dict[str, Any]:
        if self.weights:
            return {"weights": "sf = gamma mean|w_c| per channel, levels sf (2k/n - 1), straight-through gradient 1"}
        return {"activations": "learned cell widths, forward thresholds at cell midpoints, generalized STE",
                "init_rule": "LSQ's step" if self.init == "lsq" else "code: [0, 2]"}
