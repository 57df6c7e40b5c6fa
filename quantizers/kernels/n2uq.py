"""N2UQ's fused activation op: learned input cells, uniform output codes, the generalized straight-through backward.

The composite form (``quantizers.n2uq``'s reference) looks each element's cell up with ``torch.bucketize`` and
gathers its edge and width (``edges[cell]``), whose backward is an ``index_put`` per element: a ResNet-20 training
step took 6.2x full precision. Here the lookups are comparison chains over the (few) thresholds, which a compiled
kernel runs as one loop per element, forward and backward; the per-cell sums the widths need are one ``index_add_``
each over the elements' cells. At more than ``MAX_CHAINED_CELLS`` cells (8-bit layers) the chains would be longer than a binary search:
the same bodies then look cells up with ``torch.bucketize`` (eager, still one fused backward).

Contiguous float32 CPU inputs take the native kernels instead (``native_n2uq.c``, any number of cells): one pass each
way, lookups equal to the reference's ``bucketize`` (NaN included: the top code, where the chains give 0), and the
per-cell sums accumulated in double inside the pass, which the compiled and eager bodies leave to ``index_add_`` or
to the sums over the cells beyond each edge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import native
from .dispatch import fused_op, native_library, param_grad, run_kernel, scalar_grad, specialized

MAX_CHAINED_CELLS = 15  # up to 4 bits: comparison chains; above, bucketize


def _codes(x: Tensor, midpoints: Tensor, cells: int) -> Tensor:
    """How many forward thresholds (cell midpoints) each element exceeds, as ``x``'s dtype."""
    if cells > MAX_CHAINED_CELLS:
        return torch.bucketize(x, midpoints, right=False).to(x.dtype)
    code = (x > midpoints[0]).to(x.dtype)
    for i in range(1, cells):
        code = code + (x > midpoints[i]).to(x.dtype)
    return code


def _cells(x: Tensor, edges: Tensor, cells: int) -> Tensor:
    """Each element's cell, 0..cells-1 (int64): how many inner edges T_1..T_{n-1} it exceeds."""
    if cells > MAX_CHAINED_CELLS:
        return torch.bucketize(x, edges[1:-1], right=False)
    cell = (x > edges[1]).to(torch.int64)
    for i in range(2, cells):
        cell = cell + (x > edges[i]).to(torch.int64)
    return cell


def _forward_kernel(x: Tensor, midpoints: Tensor, out_step: Tensor, lowest: Tensor, *, cells: int = 3) -> Tensor:
    return out_step * (_codes(x, midpoints, cells) + lowest)


def _backward_kernel(grad: Tensor, x: Tensor, midpoints: Tensor, edges: Tensor, widths: Tensor, out_step: Tensor,
                     lowest: Tensor, *, cells: int = 3) -> tuple[Tensor, ...]:
    """grad_x (= g / a_c, g = grad * out_step strictly inside (T_0, T_n)), the out_step gradient, and the sums the
    range parameters need: chained (up to 4 bits) per inner edge i, sum of grad_x and of grad_x * x over the elements
    beyond T_i (cell >= i), as one (2, cells) tensor; searched (above), each element's cell and grad_x (x - T_c) / a_c
    for the caller's per-cell scatter."""
    code, cell = _codes(x, midpoints, cells), _cells(x, edges, cells)
    left, width = edges[cell], widths[cell]  # gathers from the (few) edges: one load each
    fraction = (x - left) / width
    linear = lowest + cell.to(x.dtype) + fraction
    inside = (linear > lowest) & (linear < lowest + cells)  # strict: torch >= 2.14's clamp gradient (older torch, which the canonical code ran on, passed it at the bounds)
    per_width = torch.where(inside, grad * out_step, 0.0) / width
    grad_out_step = (grad * (code + lowest)).sum()
    if cells > MAX_CHAINED_CELLS:
        return per_width, grad_out_step, cell.to(torch.int32), per_width * fraction
    weighted = per_width * x
    beyond = torch.stack([per_width.sum()] + [torch.where(x > edges[i], per_width, 0.0).sum() for i in range(1, cells)])
    beyond_x = torch.stack([weighted.sum()] + [torch.where(x > edges[i], weighted, 0.0).sum() for i in range(1, cells)])
    return per_width, grad_out_step, torch.stack([beyond, beyond_x])


class _N2UQQuantize(torch.autograd.Function):
    """N2UQ activations: ``out_step * (lowest + #midpoints below x)`` forward; the generalized STE backward for x,
    start, the (floored) widths and out_step. Saves the input and the small parameter tensors only."""

    @staticmethod
    def forward(ctx, x: Tensor, start: Tensor, widths: Tensor, out_step: Tensor, lowest: int) -> Tensor:  # type: ignore[override]
        cells = widths.numel()
        widths = widths.detach().contiguous()  # the native kernels index it
        edges = torch.cat([start.reshape(1), start + torch.cumsum(widths, 0)]).detach()
        midpoints = (edges[:-1] + widths / 2).contiguous()
        ctx.save_for_backward(x, edges, widths, midpoints, out_step.detach())
        ctx.lowest, ctx.cells = lowest, cells
        ctx.lib = lib = native_library(x, scalars=(start, widths, out_step))
        if lib is not None:
            return native.n2uq_forward(lib, x, midpoints, float(out_step), float(lowest))
        return run_kernel(specialized(_forward_kernel, cells=cells), (x,), midpoints, out_step.detach(), float(lowest),
                          eager=cells > MAX_CHAINED_CELLS)  # bucketize above: not worth compiling

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, edges, widths, midpoints, out_step = ctx.saved_tensors
        if ctx.lib is not None:  # per-cell sums (float64) straight from the pass
            grad_x, total, per_cell, own = native.n2uq_backward(ctx.lib, grad.contiguous(), x, midpoints, edges, widths,
                                                                float(out_step), float(ctx.lowest))
            grad_out_step = scalar_grad(total, out_step)
        else:
            grad_x, grad_out_step, per_cell, own = _compiled_backward(ctx, grad, x, edges, widths, midpoints, out_step)
        # T_c = start + a_0 + ... + a_{c-1}: start gets -sum P_c; width a_j gets -(sum over cells after j of P_c) - Q_j
        later = torch.flip(torch.cumsum(torch.flip(per_cell, [0]), 0), [0]) - per_cell
        grad_start = param_grad(-per_cell.sum(), edges[0]) if ctx.needs_input_grad[1] else None
        grad_widths = (-(later + own)).to(widths.dtype) if ctx.needs_input_grad[2] else None
        grad_step = param_grad(grad_out_step, out_step) if ctx.needs_input_grad[3] else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_start, grad_widths, grad_step, None


def _compiled_backward(ctx: Any, grad: Tensor, x: Tensor, edges: Tensor, widths: Tensor, midpoints: Tensor,
                       out_step: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The compiled or eager backward body: grad_x, the out_step gradient, and per cell P_c (sum of grad_x) and
    Q_c (sum of grad_x * fraction)."""
    result = run_kernel(specialized(_backward_kernel, cells=ctx.cells), (grad.contiguous(), x), midpoints, edges,
                        widths, out_step, float(ctx.lowest), eager=ctx.cells > MAX_CHAINED_CELLS)
    grad_x, grad_out_step = result[0], result[1]
    if ctx.cells <= MAX_CHAINED_CELLS:
        # sums over cells >= i -> per cell: P_c = sum grad_x, and Q_c = (sum grad_x x - T_c P_c) / a_c
        beyond, beyond_x = result[2][0], result[2][1]
        per_cell = beyond - torch.cat([beyond[1:], beyond.new_zeros(1)])
        per_cell_x = beyond_x - torch.cat([beyond_x[1:], beyond_x.new_zeros(1)])
        return grad_x, grad_out_step, per_cell, (per_cell_x - edges[:-1] * per_cell) / widths
    # per-cell scatter: one pass each
    cell = result[2].reshape(-1)
    per_cell = torch.zeros(ctx.cells, dtype=x.dtype, device=x.device).index_add_(0, cell, grad_x.reshape(-1))
    own = torch.zeros(ctx.cells, dtype=x.dtype, device=x.device).index_add_(0, cell, result[3].reshape(-1))
    return grad_x, grad_out_step, per_cell, own


def n2uq_reference(x: Tensor, start: Tensor, widths: Tensor, out_step: Tensor, lowest: int) -> Tensor:
    """The composite form: bucketize, gathers and :func:`quantizers.n2uq.straight_through` (the surrogate)."""
    from ..n2uq import straight_through

    edges = torch.cat([start.reshape(1), start + torch.cumsum(widths, 0)])
    midpoints = (edges[:-1] + widths / 2).detach()
    code = torch.bucketize(x.detach(), midpoints, right=False).to(x.dtype) + lowest  # thresholds exceeded
    cell = torch.bucketize(x.detach(), edges[1:-1].detach(), right=False)  # which cell, 0..n-1
    linear = lowest + cell.to(x.dtype) + (x - edges[cell]) / widths[cell]
    surrogate = torch.clamp(linear, float(lowest), float(lowest + widths.numel()))
    return out_step * straight_through(code, surrogate)


@fused_op(n2uq_reference)
def n2uq_quantize(x: Tensor, start: Tensor, widths: Tensor, out_step: Tensor, lowest: int) -> Tensor:
    """N2UQ's activation quantizer on cells ``[T_i, T_{i+1})``, ``T_0 = start``, ``T_{i+1} = T_i + widths[i]``
    (positive, already floored; 0-d ``start`` and ``out_step``, all in ``x``'s dtype); codes from ``lowest``."""
    return _N2UQQuantize.apply(x, start, widths, out_step, int(lowest))
