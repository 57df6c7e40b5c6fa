"""DSQ's fused op: the hard staircase forward, the tanh soft staircase's derivative backward, one pass each way,
saving only the input and the two scalars (step, alpha).

The composite form (``quantizers.dsq``'s reference) is eight elementwise ops whose backward autograd records one by
one: a ResNet-20 training step took 1.9x full precision. The forward here is the hard staircase, LSQ's
``clamp(round(v / s)) * s`` through LSQ's own kernels (``round(soft(z)) == round(z)``: the soft staircase is monotone
and keeps every cell's half-way point, so DSQ's forward is LSQ's, and both forms compute it as LSQ does), and the
backward the closed forms below, on ``z = v / s`` strictly inside ``(-Q_N, Q_P)`` (torch >= 2.14's clamp gradient
with number bounds; the torch the canonical code ran under passed the gradient at the bounds too, a measure-zero set):

* ``d out / d v = soft'(z)``, ``soft'(z) = (k_s k / 2) (1 - tanh^2(k (z - floor(z) - 1/2)))``;
* ``d out / d s = round(soft(z)) - soft'(z) z`` inside, the clip code outside (then times LSQ's g);
* ``d out / d alpha = s (tanh / (2 (1 - alpha)^2) - (k_s / 2) (1 - tanh^2) (z - floor(z) - 1/2) (1 / (2 - alpha) +
  1 / alpha))``, from ``k_s = 1 / (1 - alpha)`` and ``k = ln((2 - alpha) / alpha)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ste import scale_grad, stop_gradient
from .dispatch import fused_op, param_grad, run_kernel
from .lsq import lsq_quantize


def _soft_parts(v: Tensor, step: Tensor, alpha: Tensor, lo: Tensor | float, hi: Tensor | float):
    ratio = v / step
    z = torch.where(ratio < lo, lo, torch.where(ratio > hi, hi, ratio))  # clamp, with 0-d tensor bounds too
    tanh_scale = 1.0 / (1.0 - alpha)
    sharpness = torch.log((2.0 - alpha) / alpha)
    cell = torch.floor(z)
    offset = z - cell - 0.5
    tanh = torch.tanh(sharpness * offset)
    return ratio, z, offset, tanh, tanh_scale, sharpness




def _backward_kernel(grad: Tensor, v: Tensor, step: Tensor, alpha: Tensor, lo: Tensor,
                     hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ratio, z, offset, tanh, tanh_scale, sharpness = _soft_parts(v, step, alpha, lo, hi)
    inside = (ratio > lo) & (ratio < hi)
    slope = 0.5 * tanh_scale * sharpness * (1.0 - tanh * tanh)  # soft'(z)
    grad_v = torch.where(inside, grad * slope, 0.0)
    # round(z) is the forward's code (the hard staircase); the soft function only shapes the gradient
    step_terms = grad * (torch.round(z) - torch.where(inside, slope * ratio, 0.0))
    d_soft_d_alpha = (0.5 * tanh * tanh_scale * tanh_scale
                      - 0.5 * tanh_scale * (1.0 - tanh * tanh) * offset * (1.0 / (2.0 - alpha) + 1.0 / alpha))
    alpha_terms = grad * d_soft_d_alpha
    return grad_v, step_terms.sum(), alpha_terms.sum() * step


class _DSQQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, step: Tensor, alpha: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, step, alpha)
        ctx.lo, ctx.hi, ctx.grad_scale = float(-qn), float(qp), grad_scale
        # the forward is LSQ's hard staircase clamp(round(v / s)) * s: LSQ's kernels (native C where they run)
        return lsq_quantize(v, step.detach(), qn, qp)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, step, alpha = ctx.saved_tensors
        grad_v, step_total, alpha_total = run_kernel(_backward_kernel, (grad.contiguous(), v), step.detach(),
                                                     alpha.detach(), ctx.lo, ctx.hi)
        grad_step = param_grad(step_total * ctx.grad_scale, step) if ctx.needs_input_grad[1] else None
        grad_alpha = param_grad(alpha_total, alpha) if ctx.needs_input_grad[2] else None
        return grad_v if ctx.needs_input_grad[0] else None, grad_step, grad_alpha, None, None, None


def soft_staircase(z: Tensor, alpha: Tensor | float) -> Tensor:
    """DSQ's soft staircase on the code axis (cells of width 1 between consecutive integers)."""
    tanh_scale = 1.0 / (1.0 - alpha)
    sharpness = torch.log((2.0 - torch.as_tensor(alpha, dtype=z.dtype)) / torch.as_tensor(alpha, dtype=z.dtype))
    cell = stop_gradient(torch.floor(z))  # which cell: piecewise constant, frozen in the surrogate
    return cell + 0.5 + 0.5 * tanh_scale * torch.tanh(sharpness * (z - cell - 0.5))


def dsq_reference(v: Tensor, step: Tensor, alpha: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """The composite form: LSQ's gradient scale, clamp, the soft staircase, and its hard version forward:
    ``round(soft(z)) == round(z)`` (the soft staircase keeps each cell's centre and half-way points), taken as
    ``round(z)`` so the forward is LSQ's exactly, with the gradient of ``soft(z)``."""
    from ..n2uq import straight_through

    step = scale_grad(step, grad_scale)
    z = torch.clamp(v / step, -qn, qp)
    return straight_through(torch.round(z.detach()), soft_staircase(z, alpha)) * step


@fused_op(dsq_reference)
def dsq_quantize(v: Tensor, step: Tensor, alpha: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """DSQ on the grid ``[-qn, qp] * step`` (``step`` positive, 0-d ``alpha`` in (0, 0.5), both in ``v``'s dtype):
    the hard staircase forward, the soft staircase's gradient for ``v``, ``step`` (times ``grad_scale``) and
    ``alpha``."""
    return _DSQQuantize.apply(v, step, alpha, int(qn), int(qp), float(grad_scale))
