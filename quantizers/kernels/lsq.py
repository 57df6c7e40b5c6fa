"""LSQ's fused op (and the fixed-step baselines'): eq. 1-2 forward, eq. 3 and 5 backward, one pass each way.

Besides the eager/compiled bodies, each fused op here has **traced** backward bodies for a whole model under
``torch.compile``: inductor fuses them into the model's graph, and AOTAutograd's partitioner saves for backward
whatever is cheapest: a boolean mask computed from the input alone (1 byte) beats the input (4 bytes), but storing
booleans from a vectorized CPU kernel is very slow in torch 2.15's inductor (~30x a float store). The traced bodies
therefore build their masks arithmetically, as floats (1.0 / 0.0 from sign and clamp: exact, since x - y > 0 exactly
when x > y), so no boolean tensor is worth saving and the partitioner keeps the input. They equal the eager bodies
except for NaN/inf inputs or upstream gradients (NaN where the eager bodies give 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ste import round_ste, scale_grad
from . import native
from .dispatch import above, compiling, fused_op, native_library, param_grad, run_kernel, scalar_grad


def _lsq_forward_kernel(v: Tensor, step: Tensor, lo: float, hi: float) -> Tensor:
    # .to(v.dtype): a 0-d input and a 0-d float32 step would otherwise promote (bfloat16 -> float32)
    return (torch.clamp(torch.round(v / step), lo, hi) * step).to(v.dtype)


def _lsq_backward_terms(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """grad_v and the per-element terms of the step gradient (summed by the callers)."""
    z = v / step
    inside = (z > lo) & (z < hi)  # strict interior on the unrounded v/s (paper eq. 3, 5)
    grad_v = torch.where(inside, grad, 0.0)
    # eq. 3 in one expression: clamp(round(z)) - z inside, the clip code lo / hi outside.
    # torch.where (not a multiply by the mask) keeps +-inf inputs from turning into NaN.
    dvhat_dstep = torch.clamp(torch.round(z), lo, hi) - torch.where(inside, z, 0.0)
    return grad_v, grad * dvhat_dstep


def _lsq_backward_kernel(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    grad_v, terms = _lsq_backward_terms(grad, v, step, lo, hi)
    return grad_v, terms.sum()


def _per_channel_then_total(terms: Tensor) -> Tensor:
    """``terms.sum()`` as per-channel sums (dim 1) first: in a whole compiled model inductor can then fuse this
    reduction into the loops of the neighbouring BatchNorm backward's per-channel sums instead of making another pass
    over the activation."""
    if terms.dim() < 3:
        return terms.sum()
    return terms.sum(dim=[d for d in range(terms.dim()) if d != 1]).sum()


def _lsq_backward_traced(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    grad_v, terms = _lsq_backward_terms(grad, v, step, lo, hi)
    return grad_v, _per_channel_then_total(terms)


def _clip_backward_kernel(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> Tensor:
    z = v / step
    return torch.where((z > lo) & (z < hi), grad, 0.0)


def _clip_backward_traced(grad: Tensor, v: Tensor, step: Tensor, lo: float, hi: float) -> Tensor:
    z = v / step
    return grad * (above(z - lo) * above(hi - z))


class _LSQQuantize(torch.autograd.Function):
    """LSQ forward (eq. 1-2) and backward (eq. 3 and 5): saves only the input and the step."""

    @staticmethod
    def forward(ctx, v: Tensor, step: Tensor, lo: float, hi: float, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, step)
        ctx.lo, ctx.hi, ctx.grad_scale = lo, hi, grad_scale
        ctx.lib = lib = native_library(v, scalars=(step,))
        if lib is not None:
            return native.lsq_forward(lib, v, float(step), lo, hi)
        return run_kernel(_lsq_forward_kernel, (v,), step, lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, step = ctx.saved_tensors
        grad_v = grad_step = None
        lib = ctx.lib
        if lib is not None:
            want_step = ctx.needs_input_grad[1]
            grad_v, total = native.lsq_backward(lib, grad.contiguous(), v, float(step), ctx.lo, ctx.hi, want_step)
            grad_step = scalar_grad(total * ctx.grad_scale, step) if want_step else None
        elif ctx.needs_input_grad[1] and compiling():
            grad_v, total = _lsq_backward_traced(grad, v, step, ctx.lo, ctx.hi)
            grad_step = param_grad(total * ctx.grad_scale, step)
        elif ctx.needs_input_grad[1]:
            grad_v, total = run_kernel(_lsq_backward_kernel, (grad, v), step, ctx.lo, ctx.hi)
            grad_step = param_grad(total * ctx.grad_scale, step)
        elif ctx.needs_input_grad[0]:
            kernel = _clip_backward_traced if compiling() else _clip_backward_kernel
            grad_v = run_kernel(kernel, (grad, v), step, ctx.lo, ctx.hi)
        return (grad_v if ctx.needs_input_grad[0] else None), grad_step, None, None, None


def _lsq_reference(v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    step = scale_grad(step, grad_scale)
    return (round_ste(torch.clamp(v / step, -qn, qp)) * step).to(v.dtype)


@fused_op(_lsq_reference)
def lsq_quantize(v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """LSQ's quantizer ``clamp(round(v/step), -qn, qp) * step`` with the paper's gradients.

    ``qn`` is the paper's Q_N (a non-negative count of negative levels), ``grad_scale`` is g, applied to the step
    gradient only. ``step`` must be positive (callers guard it).
    """
    return _LSQQuantize.apply(v, step, float(-qn), float(qp), float(grad_scale))


# ---- per-channel steps (weights: one step per output channel, axis 0) ------------------------------------------------
# The native and compiled kernels take one scalar step; per-channel steps run these eager bodies instead. They are
# only used for weight tensors (small next to activations), so an eager pass of a few elementwise ops each way is
# cheap; like the scalar op it saves only the input and the steps.


def channel_view(step: Tensor, v: Tensor) -> Tensor:
    """``step`` (one value per channel of ``v``'s axis 0) shaped to broadcast against ``v``."""
    return step.reshape((-1,) + (1,) * (v.dim() - 1))


class _LSQQuantizePerChannel(torch.autograd.Function):
    """LSQ with ``step[c]`` for channel ``c`` of axis 0: eq. 1-2 forward, eq. 3 and 5 backward summed per channel."""

    @staticmethod
    def forward(ctx, v: Tensor, step: Tensor, lo: float, hi: float, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, step)
        ctx.lo, ctx.hi, ctx.grad_scale = lo, hi, grad_scale
        return _lsq_forward_kernel(v, channel_view(step, v), lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, step = ctx.saved_tensors
        grad_v, terms = _lsq_backward_terms(grad, v, channel_view(step, v), ctx.lo, ctx.hi)
        grad_step = None
        if ctx.needs_input_grad[1]:
            per_channel = terms.sum(dim=tuple(range(1, v.dim()))) if v.dim() > 1 else terms
            grad_step = param_grad(per_channel * ctx.grad_scale, step)
        return (grad_v if ctx.needs_input_grad[0] else None), grad_step, None, None, None


def _lsq_per_channel_reference(v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    return _lsq_reference(v, channel_view(step, v), qn, qp, grad_scale)


@fused_op(_lsq_per_channel_reference)
def lsq_quantize_per_channel(v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """:func:`lsq_quantize` with one step per channel of axis 0 (``step`` has ``v.shape[0]`` elements, positive);
    ``grad_scale`` multiplies every channel's step gradient."""
    if v.dim() == 0 or step.numel() != v.shape[0]:
        raise ValueError(f"per-channel LSQ needs one step per channel of axis 0: {step.numel()} steps for shape "
                         f"{tuple(v.shape)}")
    return _LSQQuantizePerChannel.apply(v, step, float(-qn), float(qp), float(grad_scale))
