"""APoT's fused op: clip to the learned alpha, project onto the (non-uniform) normalized levels, scale back; one pass
each way, saving only the input and alpha.

The composite form (``quantizers.apot``'s reference) projects with ``torch.bucketize`` and a gather, then lets
autograd differentiate four elementwise ops: a ResNet-20 training step took 2.3x full precision. Here the projection
is a chain of comparisons against the (at most 2^b - 1) thresholds, exact (each level is selected, never summed), so
a compiled kernel does it in one loop; above ``MAX_CHAINED_LEVELS`` levels (8-bit layers, uniform in APoT) the
bodies use ``torch.bucketize`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import fused_op, param_grad, run_kernel, specialized

MAX_CHAINED_LEVELS = 16


def _project(x: Tensor, thresholds: Tensor, levels: Tensor, count: int) -> Tensor:
    """The nearest level (ties up: ``bucketize(..., right=True)``), selected by a comparison chain or a search."""
    if count > MAX_CHAINED_LEVELS:
        return levels[torch.bucketize(x, thresholds, right=True)]
    projected = levels[0].expand_as(x)
    for i in range(count - 1):
        projected = torch.where(x >= thresholds[i], levels[i + 1], projected)
    return projected


def _clip(ratio: Tensor, lower: Tensor | float) -> Tensor:
    """``clamp(ratio, lower, 1)`` for a 0-d tensor ``lower`` too (compiled kernels get their numbers as tensors)."""
    return torch.where(ratio < lower, lower, torch.where(ratio > 1.0, 1.0, ratio))


def _forward_kernel(v: Tensor, alpha: Tensor, thresholds: Tensor, levels: Tensor, lower: Tensor, out_scale: Tensor,
                    *, count: int = 4) -> Tensor:
    return _project(_clip(v / alpha, lower), thresholds, levels, count) * alpha * out_scale


def _backward_kernel(grad: Tensor, v: Tensor, alpha: Tensor, thresholds: Tensor, levels: Tensor, lower: Tensor,
                     out_scale: Tensor, *, count: int = 4) -> tuple[Tensor, Tensor]:
    """grad_v (straight through strictly inside the clip, as torch.clamp with number bounds) and the alpha gradient's
    sum: ``project(x) - x`` inside, the clip level outside (the code's reparameterized clipping), times out_scale."""
    ratio = v / alpha
    inside = (ratio > lower) & (ratio < 1.0)
    projected = _project(_clip(ratio, lower), thresholds, levels, count)
    grad_v = torch.where(inside, grad * out_scale, 0.0)
    alpha_terms = grad * out_scale * (projected - torch.where(inside, ratio, 0.0))
    return grad_v, alpha_terms.sum()


class _APoTQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, alpha: Tensor, thresholds: Tensor, levels: Tensor, lower: float,  # type: ignore[override]
                out_scale: Tensor) -> Tensor:
        ctx.save_for_backward(v, alpha, thresholds, levels, out_scale)
        ctx.lower = lower
        count = levels.numel()  # bucketize above MAX_CHAINED_LEVELS: not worth compiling
        return run_kernel(specialized(_forward_kernel, count=count), (v,), alpha.detach(), thresholds, levels, lower,
                          out_scale, eager=count > MAX_CHAINED_LEVELS)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, alpha, thresholds, levels, out_scale = ctx.saved_tensors
        count = levels.numel()
        grad_v, total = run_kernel(specialized(_backward_kernel, count=count), (grad.contiguous(), v), alpha.detach(),
                                   thresholds, levels, ctx.lower, out_scale, eager=count > MAX_CHAINED_LEVELS)
        grad_alpha = param_grad(total, alpha) if ctx.needs_input_grad[1] else None
        return grad_v if ctx.needs_input_grad[0] else None, grad_alpha, None, None, None, None


def apot_reference(v: Tensor, alpha: Tensor, thresholds: Tensor, levels: Tensor, lower: float,
                   out_scale: Tensor) -> Tensor:
    """The composite form: clip, bucketize and gather, :func:`quantizers.n2uq.straight_through`, rescale."""
    from ..n2uq import straight_through

    x = torch.clamp(v / alpha, lower, 1.0)
    projected = straight_through(levels[torch.bucketize(x.detach(), thresholds, right=True)], x)
    return projected * alpha * out_scale


@fused_op(apot_reference)
def apot_quantize(v: Tensor, alpha: Tensor, thresholds: Tensor, levels: Tensor, lower: float,
                  out_scale: Tensor) -> Tensor:
    """``alpha * out_scale * project(clamp(v / alpha, lower, 1))`` onto the sorted normalized ``levels`` (thresholds:
    their midpoints; all in ``v``'s dtype); alpha (positive, 0-d) gets the reparameterized-clipping gradient,
    ``out_scale`` (0-d) none."""
    return _APoTQuantize.apply(v, alpha, thresholds, levels, float(lower), out_scale)
