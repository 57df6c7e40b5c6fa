"""DoReFa weights (PACT's weight scheme), fused: 2 * q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1, times an output scale;
the tensorpack gradient through tanh and the max (traced bodies for whole-model compile: see :mod:`.lsq`)."""

from __future__ import annotations


import torch
from torch import Tensor

from ..ste import round_ste, stop_gradient
from . import native
from .dispatch import above, compiling, distinct, fused_op, native_library, run_kernel

def _dorefa_forward_kernel(w: Tensor, scale: Tensor, n: float) -> Tensor:
    t = torch.tanh(w)
    peak = t.abs().max().clamp_min(1e-12)
    unit = torch.clamp(t / (2 * peak) + 0.5, 0.0, 1.0)
    codes = torch.round(unit * n) / n
    return ((2 * codes - 1) * scale).to(w.dtype)


def _dorefa_backward_kernel(grad: Tensor, w: Tensor, scale: Tensor, *, detach_max: bool = False) -> Tensor:
    t = torch.tanh(w)  # recomputed: only the weight is saved
    magnitude = t.abs()
    raw_peak = magnitude.max()
    twice_peak = 2 * raw_peak.clamp_min(1e-12)
    unsat = t / twice_peak + 0.5
    # d out / d unit = 2 * scale (round straight through); clamp(., 0, 1) passes the open interval only
    grad_unit = torch.where((unsat > 0.0) & (unsat < 1.0), grad * (2 * scale), 0.0)
    grad_t = grad_unit / twice_peak
    if not detach_max:
        # unit = t / (2 peak): d/d peak = -2 t / (2 peak)^2, passed by clamp_min only above its bound; max's
        # gradient is shared by its ties; |t| -> sign(t)
        grad_peak = -(grad_unit * t).sum() * 2 / (twice_peak * twice_peak)
        grad_peak = torch.where(raw_peak > 1e-12, grad_peak, 0.0)
        ties = magnitude == raw_peak
        grad_t = grad_t + torch.where(ties, grad_peak / ties.sum() * torch.sign(t), 0.0)
    return (grad_t * (1 - t * t)).to(w.dtype)  # tanh' = 1 - tanh^2


def _dorefa_backward_traced(grad: Tensor, w: Tensor, scale: Tensor, detach_max: bool) -> Tensor:
    t = torch.tanh(w)
    magnitude = t.abs()
    raw_peak = magnitude.max()
    twice_peak = 2 * raw_peak.clamp_min(1e-12)
    unsat = t / twice_peak + 0.5
    grad_unit = grad * (2 * scale) * (above(unsat) * above(1.0 - unsat))
    grad_t = grad_unit / twice_peak
    if not detach_max:
        grad_peak = -(grad_unit * t).sum() * 2 / (twice_peak * twice_peak) * above(raw_peak - 1e-12)
        ties = 1.0 - above(raw_peak - magnitude)  # magnitude == max
        grad_t = grad_t + ties * (grad_peak / ties.sum() * torch.sign(t))
    return (grad_t * (1 - t * t)).to(w.dtype)


_DOREFA_BACKWARD = {
    flag: distinct(_dorefa_backward_kernel, f"d{int(flag)}", detach_max=flag) for flag in (False, True)
}


class _DoReFaQuantize(torch.autograd.Function):
    """DoReFa forward and its tensorpack gradient (through tanh and the max), recomputing tanh in backward so that
    only the weight is saved."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, n: int, detach_max: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w, scale)
        ctx.detach_max = detach_max
        ctx.lib = lib = native_library(w, scalars=(scale,))
        if lib is not None:
            return native.dorefa_forward(lib, w, float(n), float(scale))
        return run_kernel(_dorefa_forward_kernel, (w,), scale, float(n))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        w, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            grad_w = None
        elif ctx.lib is not None:
            grad_w = native.dorefa_backward(ctx.lib, grad.contiguous(), w, float(scale), ctx.detach_max)
        elif compiling():
            grad_w = _dorefa_backward_traced(grad, w, scale, ctx.detach_max)
        else:
            grad_w = run_kernel(_DOREFA_BACKWARD[ctx.detach_max], (grad, w), scale)
        return grad_w, None, None, None


def _dorefa_reference(w: Tensor, scale: Tensor, n: int, detach_max: bool = False) -> Tensor:
    t = torch.tanh(w)
    peak = t.abs().max().clamp_min(1e-12)
    if detach_max:
        peak = stop_gradient(peak)
    unit = torch.clamp(t / (2 * peak) + 0.5, 0.0, 1.0)  # in [0, 1] already; the clamp guards rounding error
    codes = round_ste(unit * n) / n
    return ((2 * codes - 1) * scale).to(w.dtype)


@fused_op(_dorefa_reference)
def dorefa_quantize(w: Tensor, scale: Tensor, n: int, detach_max: bool = False) -> Tensor:
    """DoReFa's k-bit weights ``(2 q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1) * scale`` with ``n = 2^k - 1`` steps;
    the gradient goes through tanh and (unless ``detach_max``) the max, ``scale`` is a constant."""
    return _DoReFaQuantize.apply(w, scale, n, bool(detach_max))
