"""The plugin API: straight-through primitives every quantizer is built from, and the surrogate tape that checks them.

A quantizer's backward pass is deliberately not the derivative of its forward pass: rounding is passed straight
through, some methods refuse to differentiate a parameter in one place (PACT's alpha inside the step), LSQ scales the
step gradient by g. To check such gradients against finite differences we need a function whose true derivative *is*
the intended gradient: the quantizer's **surrogate**, its forward with every straight-through piece frozen at the
evaluation point. Building quantizers from the primitives below gives that surrogate for free:

* ``round_ste(x)``: forward ``round(x)``, gradient 1. Surrogate: ``x + r`` with the residual ``r = round(x0) - x0``
  frozen at the evaluation point ``x0``.
* ``stop_gradient(x)``: forward ``x``, gradient 0. Surrogate: the constant ``x0``.
* ``scale_grad(x, g)``: forward ``x``, gradient times ``g``. Surrogate: ``x0 + g * (x - x0)``.

Inside :func:`record_surrogate` each primitive computes its surrogate form and appends its frozen piece to a tape;
inside :func:`replay_surrogate` the calls, made in the same order, reuse the frozen pieces, so ``forward(v0 + h)`` is
the surrogate evaluated at a perturbed point. The conformance kit (:mod:`quantizers.conformance`) uses this to compare
autograd with central finite differences for any quantizer, including users' own. The fused kernels of
:mod:`quantizers.kernels` run their reference form (composed from these primitives) while a tape is active.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["round_ste", "stop_gradient", "scale_grad", "record_surrogate", "replay_surrogate", "SurrogateTape",
           "tape_active"]


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


def active_tape() -> SurrogateTape | None:
    return getattr(_state, "tape", None)


@contextlib.contextmanager
def record_surrogate() -> Iterator[SurrogateTape]:
    """Run forwards in surrogate form, recording the frozen pieces at this evaluation point."""
    tape = SurrogateTape()
    previous, _state.tape = active_tape(), tape
    try:
        yield tape
    finally:
        _state.tape = previous


@contextlib.contextmanager
def replay_surrogate(tape: SurrogateTape) -> Iterator[SurrogateTape]:
    """Run forwards in surrogate form reusing ``tape``'s frozen pieces (one forward per ``rewind``)."""
    tape.replaying = True
    tape.rewind()
    previous, _state.tape = active_tape(), tape
    try:
        yield tape
    finally:
        _state.tape = previous


def tape_active() -> bool:
    """Whether a surrogate tape is recording or replaying in this thread (fused ops then run their reference form)."""
    return active_tape() is not None


# --------------------------------------------------------------------------------------------------------------
# The three primitives


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
    tape = active_tape()
    if tape is None:
        return _RoundSTE.apply(x)
    residual = tape.freeze(torch.round(x) - x)
    return x + residual


def stop_gradient(x: Tensor) -> Tensor:
    """``x`` in the forward pass, no gradient in the backward pass (a piece the method does not differentiate)."""
    tape = active_tape()
    if tape is None:
        return x.detach()
    return tape.freeze(x)


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass; the gradient reaching ``x`` is multiplied by ``scale`` (LSQ's gradscale)."""
    tape = active_tape()
    if tape is None:
        if scale == 1.0:
            return x
        return _ScaleGrad.apply(x, scale)
    anchor = tape.freeze(x)
    return anchor + scale * (x - anchor)
