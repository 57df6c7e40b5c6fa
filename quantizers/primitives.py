"""Straight-through primitives that every quantizer is built from, and the surrogate tape that checks them.

A quantizer's backward pass is deliberately not the derivative of its forward pass: rounding is passed straight
through, some methods refuse to differentiate a parameter in one place (PACT's alpha inside the step), LSQ scales the
step gradient by g. To check such gradients against finite differences we need a function whose true derivative *is*
the intended gradient: the quantizer's **surrogate**, its forward with every straight-through piece frozen at the
evaluation point. Building quantizers from the primitives below gives that surrogate for free:

* ``round_ste(x)``: forward ``round(x)``, gradient 1. Surrogate: ``x + r`` with the residual ``r = round(x0) - x0``
  frozen at the evaluation point ``x0``.
* ``stop_gradient(x)``: forward ``x``, gradient 0. Surrogate: the constant ``x0``.
* ``scale_grad(x, g)``: forward ``x``, gradient times ``g``. Surrogate: ``x0 + g * (x - x0)``.
* ``lsq_quantize(v, step, qn, qp, g)``: LSQ's fused forward/backward (equations 1-3 and 5). Surrogate: the same maths
  written with the three primitives above.

Normally the primitives run their fast path. Inside :func:`record_surrogate` each call computes its surrogate form
and appends its frozen piece to a tape; inside :func:`replay_surrogate` the calls, made in the same order, reuse the
frozen pieces, so ``forward(v0 + h)`` is the surrogate evaluated at a perturbed point. ``quantbench.testing`` uses
this to compare autograd with central finite differences for any quantizer, including users' own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "round_ste",
    "stop_gradient",
    "scale_grad",
    "lsq_quantize",
    "record_surrogate",
    "replay_surrogate",
    "SurrogateTape",
]


class SurrogateTape:
    """The frozen straight-through pieces of one forward pass, in call order."""

    def __init__(self) -> None:
        self.pieces: list[Tensor] = []
        self.replaying = False
        self._cursor = 0

    def freeze(self, piece: Tensor) -> Tensor:
        """Record ``piece`` (recording) or hand back the piece recorded at this position (replaying)."""
        if not self.replaying:
            self.pieces.append(piece.detach().clone())
            return self.pieces[-1]
        if self._cursor >= len(self.pieces):
            raise RuntimeError(
                "the quantizer made more straight-through calls when replayed than when recorded; "
                "its forward must take the same path for nearby inputs"
            )
        piece = self.pieces[self._cursor]
        self._cursor += 1
        return piece

    def rewind(self) -> None:
        self._cursor = 0


_state = threading.local()


def _active_tape() -> SurrogateTape | None:
    return getattr(_state, "tape", None)


@contextlib.contextmanager
def record_surrogate() -> Iterator[SurrogateTape]:
    """Run forwards in surrogate form, recording the frozen pieces at this evaluation point."""
    tape = SurrogateTape()
    previous, _state.tape = _active_tape(), tape
    try:
        yield tape
    finally:
        _state.tape = previous


@contextlib.contextmanager
def replay_surrogate(tape: SurrogateTape) -> Iterator[SurrogateTape]:
    """Run forwards in surrogate form reusing ``tape``'s frozen pieces (one forward per ``rewind``)."""
    tape.replaying = True
    tape.rewind()
    previous, _state.tape = _active_tape(), tape
    try:
        yield tape
    finally:
        _state.tape = previous


# --------------------------------------------------------------------------------------------------------------
# Fast paths: one small autograd.Function each, so nothing beyond what backward needs is saved.


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even, as ``torch.round``) with a straight-through (identity) gradient."""
    tape = _active_tape()
    if tape is None:
        return _RoundSTE.apply(x)
    residual = tape.freeze(torch.round(x) - x)
    return x + residual


def stop_gradient(x: Tensor) -> Tensor:
    """``x`` in the forward pass, no gradient in the backward pass (a piece the method does not differentiate)."""
    tape = _active_tape()
    if tape is None:
        return x.detach()
    return tape.freeze(x)


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass; the gradient reaching ``x`` is multiplied by ``scale`` (LSQ's gradscale)."""
    tape = _active_tape()
    if tape is None:
        if scale == 1.0:
            return x
        return _ScaleGrad.apply(x, scale)
    anchor = tape.freeze(x)
    return anchor + scale * (x - anchor)


class _LSQQuantize(torch.autograd.Function):
    """LSQ forward (eq. 1-2) and backward (eq. 3 and 5) in one Function.

    Saves only the input and the step (no input-sized intermediates); the boundary masks are taken on the
    unrounded ``v/s`` with a strict interior, as in the paper.
    """

    @staticmethod
    def forward(ctx, v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        # .to(v.dtype): a 0-d input and a 0-d float32 step would otherwise promote (bfloat16 -> float32)
        return (torch.clamp(torch.round(v / step), -qn, qp) * step).to(v.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, step = ctx.saved_tensors
        z = v / step
        inside = (z > -ctx.qn) & (z < ctx.qp)
        grad_v = torch.where(inside, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            # eq. 3 in one expression: clamp(round(z)) - z inside, the clip code -Qn / Qp outside.
            # torch.where (not a multiply by the mask) keeps +-inf inputs from turning into NaN.
            dvhat_dstep = torch.clamp(torch.round(z), -ctx.qn, ctx.qp) - torch.where(inside, z, 0.0)
            grad_step = (grad * dvhat_dstep).sum().mul_(ctx.grad_scale).reshape(step.shape).to(step.dtype)
        return grad_v, grad_step, None, None, None


def lsq_quantize(v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """LSQ's quantizer ``clamp(round(v/step), -qn, qp) * step`` with the paper's gradients.

    ``qn`` is the paper's Q_N (a non-negative count of negative levels), ``grad_scale`` is g, applied to the step
    gradient only. ``step`` must be positive (callers guard it).
    """
    tape = _active_tape()
    if tape is None:
        return _LSQQuantize.apply(v, step, qn, qp, grad_scale)
    step = scale_grad(step, grad_scale)
    return (round_ste(torch.clamp(v / step, -qn, qp)) * step).to(v.dtype)
