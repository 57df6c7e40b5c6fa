"""EWGS's fused op: normalize to the learned interval, discretize, rescale, with EWGS's sign-dependent gradient; one
pass each way, saving only the input and the scalars.

The composite form (``quantizers.ewgs``'s reference: clamp, the discretizer's ``autograd.Function``, then the output
scale, each recorded by autograd) took 1.6x full precision in a ResNet-20 training step. With ``t = (v - l) / w``,
``x_n = clamp(t, 0, 1)``, ``x_q = round(x_n (L - 1)) / (L - 1)`` and ``out = (c x_q + d) m + shift`` (``c, d`` = 2, -1
for weights, 1, 0 otherwise; ``m`` and ``shift`` held constant):

* ``g_q = grad c m``; EWGS: ``g_n = g_q (1 + delta sign(g_q) (x_n - x_q))``; zero unless ``0 < t < 1`` (torch.clamp's
  gradient with number bounds);
* ``d / d v = g_n / w``, ``d / d l = -sum(g_n) / w``, ``d / d w = -sum(g_n t) / w`` (autograd takes ``w = u - l``
  back to the interval's ends).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ste import active_tape
from .dispatch import fused_op, param_grad, run_kernel, specialized


def _forward_kernel(v: Tensor, lower: Tensor, width: Tensor, multiplier: Tensor, shift: Tensor, steps: Tensor,
                    *, centered: bool = False) -> Tensor:
    ratio = (v - lower) / width
    x_n = torch.where(ratio < 0.0, 0.0, torch.where(ratio > 1.0, 1.0, ratio))
    x_q = torch.round(x_n * steps) / steps
    return ((2 * x_q - 1 if centered else x_q) * multiplier) + shift


def _backward_kernel(grad: Tensor, v: Tensor, lower: Tensor, width: Tensor, multiplier: Tensor, steps: Tensor,
                     delta: Tensor, *, centered: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    ratio = (v - lower) / width
    x_n = torch.where(ratio < 0.0, 0.0, torch.where(ratio > 1.0, 1.0, ratio))
    x_q = torch.round(x_n * steps) / steps
    grad_q = grad * (2 * multiplier if centered else multiplier)
    grad_n = grad_q * (1 + delta * torch.sign(grad_q) * (x_n - x_q))
    grad_t = torch.where((ratio > 0.0) & (ratio < 1.0), grad_n, 0.0)
    return grad_t / width, -grad_t.sum() / width, -(grad_t * ratio).sum() / width


class _EWGSQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, lower: Tensor, width: Tensor, multiplier: Tensor, shift: Tensor,  # type: ignore[override]
                steps: int, delta: float, centered: bool) -> Tensor:
        ctx.save_for_backward(v, lower, width, multiplier)
        ctx.steps, ctx.delta, ctx.centered = steps, delta, centered
        return run_kernel(specialized(_forward_kernel, centered=centered), (v,), lower.detach(), width.detach(), multiplier, shift, float(steps))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, lower, width, multiplier = ctx.saved_tensors
        grad_v, grad_lower, grad_width = run_kernel(specialized(_backward_kernel, centered=ctx.centered),
                                                    (grad.contiguous(), v), lower.detach(),
                                                    width.detach(), multiplier, float(ctx.steps), ctx.delta)
        return (grad_v if ctx.needs_input_grad[0] else None,
                param_grad(grad_lower, lower) if ctx.needs_input_grad[1] else None,
                param_grad(grad_width, width) if ctx.needs_input_grad[2] else None,
                None, None, None, None, None)


class _EWGSDiscretizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_n: Tensor, steps: int, delta: float) -> Tensor:  # type: ignore[override]
        x_q = torch.round(x_n * steps) / steps
        ctx.delta = delta
        ctx.save_for_backward(x_n - x_q)
        return x_q

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (error,) = ctx.saved_tensors
        return grad * (1 + ctx.delta * torch.sign(grad) * error), None, None


def ewgs_discretize(x_n: Tensor, steps: int, delta: float) -> Tensor:
    """``round(x_n * steps) / steps`` with EWGS's gradient ``g (1 + delta sign(g) (x_n - x_q))``.

    Under a surrogate tape: ``x_q0 + (x_n - x_n0) + (delta/2) S ((x_n - x_q0)^2 - (x_n0 - x_q0)^2)``, whose
    derivative at x_n0 is EWGS's factor, with ``S`` the sign of the upstream gradient: a frozen piece that is zero
    when recorded and is filled by a hook when the recording forward is back-propagated (its quantizer declares
    ``upstream_dependent_gradient``).
    """
    tape = active_tape()
    if tape is None:
        return _EWGSDiscretizer.apply(x_n, steps, float(delta))
    replaying = tape.replaying
    x_q0 = tape.freeze(torch.round(x_n * steps) / steps)
    x_n0 = tape.freeze(x_n)
    upstream_sign = tape.freeze(torch.zeros_like(x_n))
    out = x_q0 + (x_n - x_n0) + (delta / 2) * upstream_sign * ((x_n - x_q0) ** 2 - (x_n0 - x_q0) ** 2)
    if not replaying and out.requires_grad:
        out.register_hook(lambda grad: upstream_sign.copy_(torch.sign(grad)))
    return out


def ewgs_reference(v: Tensor, lower: Tensor, width: Tensor, multiplier: Tensor, shift: Tensor, steps: int,
                   delta: float, centered: bool) -> Tensor:
    """The composite form: clamp, :func:`ewgs_discretize` (the surrogate under a tape), the output scale."""
    x_n = torch.clamp((v - lower) / width, 0.0, 1.0)
    x_q = ewgs_discretize(x_n, steps, delta)
    return ((2 * x_q - 1 if centered else x_q) * multiplier) + shift


@fused_op(ewgs_reference)
def ewgs_quantize(v: Tensor, lower: Tensor, width: Tensor, multiplier: Tensor, shift: Tensor, steps: int,
                  delta: float, centered: bool) -> Tensor:
    """EWGS on the interval ``[lower, lower + width]`` (0-d, ``width`` positive, both differentiated) with ``steps``
    (L - 1) steps: ``(2 x_q - 1 or x_q) * multiplier + shift`` (0-d constants, not differentiated)."""
    return _EWGSQuantize.apply(v, lower, width, multiplier.detach(), shift.detach(), int(steps), float(delta),
                               bool(centered))
