"""QIL's fused op: the transformer (interval [prune, clip] onto [0, 1], optional exponent gamma) and the discretizer
round(x * q) / q; the transformer differentiated exactly, the discretizer straight through (traced bodies for
whole-model compile: see :mod:`.lsq`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..ste import round_ste, stop_gradient
from . import native
from .dispatch import above, compiling, distinct, fused_op, native_library, param_grad, run_kernel, scalar_grad

def _qil_forward_kernel(
    v: Tensor, prune: Tensor, clip: Tensor, mid: Tensor, width: Tensor, gamma: Tensor, out_scale: Tensor, q: float,
    *, signed: bool = False, has_gamma: bool = False, has_scale: bool = False,
) -> Tensor:
    magnitude = v.abs() if signed else v
    inside = (magnitude > prune) & (magnitude <= clip)
    unit = (torch.where(inside, magnitude, mid) - prune) / width
    if has_gamma:
        unit = unit**gamma
    transformed = torch.where(magnitude > clip, 1.0, torch.where(inside, unit, 0.0))
    if signed:
        transformed = transformed * torch.sign(v)
    discretized = torch.round(transformed * q) / q
    if has_scale:
        discretized = discretized * out_scale
    return discretized.to(v.dtype)


def _qil_backward_kernel(
    grad: Tensor, v: Tensor, prune: Tensor, clip: Tensor, width: Tensor, gamma: Tensor, out_scale: Tensor,
    *, signed: bool = False, has_gamma: bool = False, has_scale: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    magnitude = v.abs() if signed else v
    inside = (magnitude > prune) & (magnitude <= clip)
    base = (magnitude - prune) / width  # in (0, 1] inside; outside it is masked out below
    upstream = grad * out_scale if has_scale else grad  # round straight through: d x_bar / d transformed = 1
    if signed:
        upstream = upstream * torch.sign(v)
    if has_gamma:
        grad_base = torch.where(inside, upstream * (gamma * base ** (gamma - 1)), 0.0)
        grad_gamma = torch.where(inside, upstream * (base**gamma * torch.log(base)), 0.0).sum()
    else:
        grad_base = torch.where(inside, upstream, 0.0)
        grad_gamma = grad_base.new_zeros(())
    grad_magnitude = grad_base / width
    grad_v = grad_magnitude * torch.sign(v) if signed else grad_magnitude
    grad_prune = -grad_magnitude.sum()
    grad_width = -torch.where(inside, grad_magnitude * base, 0.0).sum()
    return grad_v, grad_prune, grad_width, grad_gamma


def _qil_backward_traced(
    grad: Tensor, v: Tensor, prune: Tensor, clip: Tensor, width: Tensor, gamma: Tensor | None,
    out_scale: Tensor | None, signed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    magnitude = v.abs() if signed else v
    inside = above(magnitude - prune) * (1.0 - above(magnitude - clip))  # prune < m <= clip
    # outside the interval evaluate at its middle (finite pow / log), as the forward does; exact inside
    middle = (prune + clip) / 2
    safe = torch.clamp(magnitude, prune, clip) * inside + middle * (1.0 - inside)
    base = (safe - prune) / width
    upstream = grad * out_scale if out_scale is not None else grad
    if signed:
        upstream = upstream * torch.sign(v)
    if gamma is not None:
        grad_base = upstream * (gamma * base ** (gamma - 1)) * inside
        grad_gamma = (upstream * (base**gamma * torch.log(base)) * inside).sum()
    else:
        grad_base = upstream * inside
        grad_gamma = grad_base.new_zeros(())
    grad_magnitude = grad_base / width
    grad_v = grad_magnitude * torch.sign(v) if signed else grad_magnitude
    return grad_v, -grad_magnitude.sum(), -(grad_magnitude * base).sum(), grad_gamma


def _qil_variants() -> dict[tuple[bool, bool, bool], tuple[Callable, Callable]]:
    variants = {}
    for signed in (False, True):
        for has_gamma in (False, True):
            for has_scale in (False, True):
                flags = {"signed": signed, "has_gamma": has_gamma, "has_scale": has_scale}
                tag = f"s{int(signed)}g{int(has_gamma)}c{int(has_scale)}"
                variants[(signed, has_gamma, has_scale)] = (
                    distinct(_qil_forward_kernel, tag, **flags), distinct(_qil_backward_kernel, tag, **flags)
                )
    return variants


_QIL_KERNELS = _qil_variants()


def _native_qil(flags: tuple[bool, bool, bool], v: Tensor, *scalars: Tensor | None) -> Any:
    """Native QIL: unsigned without gamma (its activations) everywhere the kernels build; signed or with gamma (its
    weights) where the vector kernels equal torch's pow bit for bit (``native.vector_math``)."""
    signed, has_gamma, _ = flags
    lib = native_library(v, scalars=tuple(s for s in scalars if s is not None))
    if lib is None or not (signed or has_gamma) or native.vector_math():
        return lib
    return None


class _QILQuantize(torch.autograd.Function):
    """QIL forward and backward (transformer differentiated exactly inside the interval, discretizer straight
    through, output scale constant): saves only the input and the interval's scalars."""

    @staticmethod
    def forward(ctx, v, prune, clip, distance, gamma, out_scale, q, signed):  # type: ignore[override]
        ctx.save_for_backward(v, prune, clip, distance, gamma, out_scale)
        ctx.flags = (bool(signed), gamma is not None, out_scale is not None)
        ctx.lib = lib = _native_qil(ctx.flags, v, prune, clip, distance, gamma, out_scale)
        if lib is not None:
            # In Python floats: 2 * distance is exact; mid only stands in for outside elements, whose output is
            # 0 or 1 whatever it is.
            low, high, width = float(prune), float(clip), 2.0 * float(distance)
            scale = None if out_scale is None else float(out_scale)
            if signed or gamma is not None:
                return native.qil_gamma_forward(lib, v, low, high, (low + high) / 2, width,
                                                None if gamma is None else float(gamma), float(q), scale, signed)
            return native.qil_forward(lib, v, low, high, (low + high) / 2, width, float(q), scale)
        forward_kernel, _ = _QIL_KERNELS[ctx.flags]
        mid, width = (prune + clip) / 2, 2 * distance
        dummy = v.new_ones(()) if gamma is None or out_scale is None else None
        return run_kernel(
            forward_kernel, (v,), prune, clip, mid, width, dummy if gamma is None else gamma,
            dummy if out_scale is None else out_scale, float(q),
        )

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, prune, clip, distance, gamma, out_scale = ctx.saved_tensors
        lib = ctx.lib
        if lib is not None:
            interval = (float(prune), float(clip), 2.0 * float(distance))
            scale = None if out_scale is None else float(out_scale)
            if ctx.flags[0] or gamma is not None:
                grad_v, sum_grad, sum_base, sum_gamma = native.qil_gamma_backward(
                    lib, grad.contiguous(), v, *interval, None if gamma is None else float(gamma), scale, ctx.flags[0]
                )
            else:
                grad_v, sum_grad, sum_base = native.qil_backward(lib, grad.contiguous(), v, *interval, scale)
                sum_gamma = 0.0
            grad_prune, grad_width = scalar_grad(-sum_grad, prune), scalar_grad(-sum_base, distance)
            grad_gamma = None if gamma is None else scalar_grad(sum_gamma, gamma)
        elif compiling():
            grad_v, grad_prune, grad_width, grad_gamma = _qil_backward_traced(
                grad, v, prune, clip, 2 * distance, gamma, out_scale, ctx.flags[0]
            )
        else:
            _, backward_kernel = _QIL_KERNELS[ctx.flags]
            dummy = v.new_ones(()) if gamma is None or out_scale is None else None
            grad_v, grad_prune, grad_width, grad_gamma = run_kernel(
                backward_kernel, (grad, v), prune, clip, 2 * distance, dummy if gamma is None else gamma,
                dummy if out_scale is None else out_scale,
            )
        needs = ctx.needs_input_grad
        return (
            grad_v if needs[0] else None,
            param_grad(grad_prune, prune) if needs[1] else None,
            None,
            param_grad(2 * grad_width, distance) if needs[3] else None,
            param_grad(grad_gamma, gamma) if gamma is not None and needs[4] else None,
            None,
            None,
            None,
        )


def _qil_reference(
    v: Tensor, prune: Tensor, clip: Tensor, distance: Tensor, gamma: Tensor | None, q: int, signed: bool,
    out_scale: Tensor | None = None,
) -> Tensor:
    magnitude = v.abs() if signed else v
    # Interior per QIL eq. 3/5: prune below c - d, clip above c + d (the end points give the same values).
    inside = (magnitude > prune) & (magnitude <= clip)
    # Outside elements are evaluated at the interval's middle: masked anyway, but this keeps their (zero)
    # gradients finite for +-inf inputs and for gamma's log(u).
    safe = torch.where(inside, magnitude, ((prune + clip) / 2).detach())
    unit = (safe - prune) / (2 * distance)
    if gamma is not None:
        unit = unit**gamma
    transformed = torch.where(
        magnitude > clip, torch.ones_like(unit), torch.where(inside, unit, torch.zeros_like(unit))
    )
    if signed:
        transformed = transformed * torch.sign(v)
    discretized = round_ste(transformed * q) / q
    if out_scale is not None:
        discretized = discretized * stop_gradient(out_scale)
    return discretized.to(v.dtype)


@fused_op(_qil_reference)
def qil_quantize(
    v: Tensor, prune: Tensor, clip: Tensor, distance: Tensor, gamma: Tensor | None, q: int, signed: bool,
    out_scale: Tensor | None = None,
) -> Tensor:
    """QIL: ``round(T(v) * q) / q`` (times the constant ``out_scale``), with the transformer ``T`` mapping the
    interval (prune, clip] of ``|v|`` (signed) or ``v`` linearly onto (0, 1], raised to ``gamma`` when given: 0 below
    the interval, 1 above (times sign(v) when signed). ``distance`` is the half-width: ``clip - prune = 2 distance``.
    """
    return _QILQuantize.apply(v, prune, clip, distance, gamma, out_scale, q, bool(signed))
