"""PACT's fused clip quantizer: y = clip(v, 0 or -alpha, alpha), round(y / step) * step with step = alpha / Q_P
held constant; one pass forward, one pass backward (traced bodies for whole-model compile: see :mod:`.lsq`)."""

from __future__ import annotations


import torch
from torch import Tensor

from ..ste import round_ste, stop_gradient
from . import native
from .dispatch import above, compiling, distinct, fused_op, native_library, param_grad, run_kernel, scalar_grad

def _pact_forward_kernel(v: Tensor, alpha: Tensor, step: Tensor, *, signed: bool = False) -> Tensor:
    # x == alpha belongs to the alpha branch (PACT eq. 3) and x = 0 to the identity branch.
    inner = torch.where(v <= -alpha, -alpha, v) if signed else torch.where(v >= 0, v, 0.0)
    clipped = torch.where(v >= alpha, alpha, inner)
    return (torch.round(clipped / step) * step).to(v.dtype)


def _pact_backward_kernel(grad: Tensor, v: Tensor, alpha: Tensor, *, signed: bool = False) -> tuple[Tensor, Tensor]:
    upper = v >= alpha
    if signed:
        lower = v <= -alpha
        grad_v = torch.where(upper | lower, 0.0, grad)
        grad_alpha = torch.where(upper, grad, torch.where(lower, -grad, 0.0))
    else:
        grad_v = torch.where((v >= 0) & ~upper, grad, 0.0)
        grad_alpha = torch.where(upper, grad, 0.0)
    return grad_v, grad_alpha.sum()


def _pact_backward_traced(grad: Tensor, v: Tensor, alpha: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    upper = 1.0 - above(alpha - v)  # v >= alpha
    if signed:
        lower = 1.0 - above(v + alpha)  # v <= -alpha
        return grad * ((1.0 - upper) * (1.0 - lower)), (grad * (upper - lower * (1.0 - upper))).sum()
    nonnegative = 1.0 - above(-v)  # v >= 0
    return grad * (nonnegative * (1.0 - upper)), (grad * upper).sum()


_PACT_KERNELS = {
    signed: (
        distinct(_pact_forward_kernel, f"s{int(signed)}", signed=signed),
        distinct(_pact_backward_kernel, f"s{int(signed)}", signed=signed),
    )
    for signed in (False, True)
}


class _PACTQuantize(torch.autograd.Function):
    """PACT forward and backward (dy/dx = 1 inside the clip range, dy/dalpha = 1 at or above alpha, -1 at or below
    -alpha when signed): saves only the input and alpha."""

    @staticmethod
    def forward(ctx, v: Tensor, alpha: Tensor, qp: int, signed: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, alpha)
        ctx.signed = signed
        step = alpha / qp
        ctx.lib = lib = native_library(v, scalars=(alpha,))
        if lib is not None:
            return native.pact_forward(lib, v, float(alpha), float(step), signed)
        forward_kernel, _ = _PACT_KERNELS[signed]
        return run_kernel(forward_kernel, (v,), alpha, step)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, alpha = ctx.saved_tensors
        lib = ctx.lib
        if lib is not None:
            grad_v, total = native.pact_backward(lib, grad.contiguous(), v, float(alpha), ctx.signed)
            total = scalar_grad(total, alpha)
        elif compiling():
            grad_v, total = _pact_backward_traced(grad, v, alpha, ctx.signed)
        else:
            _, backward_kernel = _PACT_KERNELS[ctx.signed]
            grad_v, total = run_kernel(backward_kernel, (grad, v), alpha)
        grad_alpha = param_grad(total, alpha) if ctx.needs_input_grad[1] else None
        return (grad_v if ctx.needs_input_grad[0] else None), grad_alpha, None, None


def _pact_reference(v: Tensor, alpha: Tensor, qp: int, signed: bool = False) -> Tensor:
    # Explicit branches (not clamp, whose subgradient at the bound changed across torch versions): x == alpha
    # belongs to the alpha branch (PACT eq. 3) and x = 0 to the identity branch (dy/dx = 1 on [0, alpha)).
    if signed:
        inner = torch.where(v <= -alpha, -alpha, v)
    else:
        inner = torch.where(v >= 0, v, torch.zeros_like(v))
    clipped = torch.where(v >= alpha, alpha, inner)
    step = stop_gradient(alpha) / qp  # PACT does not differentiate alpha inside the step
    return (round_ste(clipped / step) * step).to(v.dtype)


@fused_op(_pact_reference)
def pact_quantize(v: Tensor, alpha: Tensor, qp: int, signed: bool = False) -> Tensor:
    """PACT's quantizer: clip ``v`` to [0, alpha] ([-alpha, alpha] when signed), then ``Q_P`` uniform steps.

    ``alpha`` (positive, 0-d) gets PACT's gradient; it is not differentiated inside the step ``alpha / qp``.
    """
    return _PACTQuantize.apply(v, alpha, qp, bool(signed))
