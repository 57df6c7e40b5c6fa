"""N2UQ's native activation kernels (``native_n2uq.c``) against the reference path and torch.bucketize: identical
outputs and input gradients, per-cell sums as the eager body's terms summed in double, at every bit width."""

from __future__ import annotations

import pytest
import torch

import quantizers
from quantizers.kernels import dispatch, native
from tests.quantizers.kernels.test_kernels import BITS, build, compare_paths, forward_backward


@pytest.fixture
def two_threads():
    """Two torch threads: inputs of >= 32768 elements split across them (per-thread partial sums)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _uneven_n2uq(bits: int, signed: bool, v: torch.Tensor, generator: torch.Generator) -> quantizers.Quantizer:
    quantizer = build("n2uq", bits, signed, "activation", torch.float32)
    with torch.no_grad():
        quantizer(v)
        quantizer.widths.mul_(0.5 + torch.rand(quantizer.widths.shape, generator=generator))
    return quantizer


def _n2uq_specials(quantizer, generator: torch.Generator) -> torch.Tensor:
    """Every edge and forward threshold (cell midpoint), exactly, in random order."""
    edges, widths = quantizer.edges()
    special = torch.cat([edges, edges[:-1] + widths / 2]).detach()
    return special[torch.randperm(special.numel(), generator=generator)]


@pytest.mark.parametrize("numel", [37, 4099, 40003])  # a partial vector, one thread, the threaded split
@pytest.mark.parametrize("bits", BITS)  # thresholds counted one by one up to 4 bits, the bucketed search at 8
def test_native_n2uq_matches_reference(bits: int, numel: int, monkeypatch, two_threads) -> None:
    """N2UQ's native kernels on uneven cells, inputs on every edge and threshold and far outside: outputs identical
    to the reference (bucketize and gathers), gradients to float32 rounding, reproducible; the kernels did run."""
    assert native.library() is not None, native.failure()
    calls = []
    for name in ("n2uq_forward", "n2uq_backward"):
        monkeypatch.setattr(native, name, lambda *args, kernel=getattr(native, name), name=name:
                            calls.append(name) or kernel(*args))
    generator = torch.Generator().manual_seed(bits * numel)
    for signed in (False, True):
        v = torch.randn(numel, generator=generator) * 2
        upstream = torch.randn(numel, generator=generator)
        quantizer = _uneven_n2uq(bits, signed, v, generator)
        special = torch.cat([_n2uq_specials(quantizer, generator), torch.tensor([50.0, -50.0, 0.0])])[:numel]
        v[torch.randperm(numel, generator=generator)[: special.numel()]] = special
        before = len(calls)
        with dispatch.kernels("native"):
            compare_paths(quantizer, v, upstream, rtol=1e-5)
            first, again = forward_backward(quantizer, v, upstream), forward_backward(quantizer, v, upstream)
        assert calls[before:] == ["n2uq_forward", "n2uq_backward"] * 3, "the fast path did not run the native kernels"
        assert torch.equal(first[1], again[1])
        for key in first[2]:
            assert torch.equal(first[2][key], again[2][key]), "native parameter gradients are not reproducible"


@pytest.mark.parametrize("numel", [37, 40003])
@pytest.mark.parametrize("bits", BITS)
def test_native_n2uq_backward_is_the_eager_body_with_double_sums(bits: int, numel: int, two_threads) -> None:
    """The backward kernel element by element: grad_x identical to the eager body's, cells as bucketize's, and the
    per-cell and out_step sums equal to the same float32 terms summed in float64 (NaN and infinities included)."""
    from quantizers.kernels.n2uq import _backward_kernel

    lib = native.library()
    assert lib is not None, native.failure()
    generator = torch.Generator().manual_seed(bits + numel)
    x = torch.randn(numel, generator=generator) * 2
    grad = torch.randn(numel, generator=generator)
    quantizer = _uneven_n2uq(bits, True, x, generator)
    special = torch.cat([_n2uq_specials(quantizer, generator),
                         torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])])[:numel]
    x[torch.randperm(numel, generator=generator)[: special.numel()]] = special
    edges, widths = (t.detach().contiguous() for t in quantizer.edges())
    midpoints = (edges[:-1] + widths / 2).contiguous()
    out_step, lowest, cells = quantizer.out_step.detach(), float(quantizer.lowest), widths.numel()

    grad_x, total, per_cell, own = native.n2uq_backward(lib, grad, x, midpoints, edges, widths, float(out_step), lowest)

    expected = _backward_kernel(grad, x, midpoints, edges, widths, out_step, lowest, cells=cells)[0]
    assert torch.equal(grad_x, expected)
    cell = torch.bucketize(x, edges[1:-1])  # the reference's cells (NaN: the last)
    terms = expected * ((x - edges[cell]) / widths[cell])
    code = torch.bucketize(x, midpoints).to(x.dtype)
    sums = [torch.zeros(cells, dtype=torch.float64).index_add_(0, cell, t.double()) for t in (expected, terms)]
    torch.testing.assert_close(per_cell, sums[0], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(own, sums[1], rtol=1e-12, atol=1e-9, equal_nan=True)
    assert own.isnan().any() == x.isnan().any()  # 0 * NaN fraction: NaN, as the reference's gradient
    assert total == pytest.approx(float((grad * (code + lowest)).double().sum()), rel=1e-12, abs=1e-9)


def test_native_n2uq_codes_equal_bucketize() -> None:
    """The forward kernel's lookups are torch.bucketize's for any threshold count (compared one by one, bucketed
    search, torch's own search above 255) and any table: ties, duplicates, no or infinite spread, unsorted."""
    lib = native.library()
    assert lib is not None, native.failure()
    generator = torch.Generator().manual_seed(0)
    tables = []
    for count in (1, 2, 3, 7, 15, 16, 17, 100, 254, 255, 300):
        sorted_table = torch.sort(torch.randn(count, generator=generator) * 3).values
        sorted_table[count // 2:count // 2 + 2] = sorted_table[count // 2]  # a duplicate
        tables += [sorted_table, sorted_table[torch.randperm(count, generator=generator)]]
    tables += [torch.full((20,), 0.5), torch.tensor([-3e38, 0.0, 3e38]), torch.linspace(-3e38, 3e38, 40)]
    for table in tables:
        x = torch.cat([torch.randn(4001, generator=generator) * 4, table, table.nextafter(torch.tensor(-4e38)),
                       table.nextafter(torch.tensor(4e38)), torch.tensor([float("nan"), float("inf"), -float("inf")])])
        out = native.n2uq_forward(lib, x, table.contiguous(), 0.25, -2.0)
        expected = 0.25 * (torch.bucketize(x, table).to(x.dtype) + -2.0)
        assert torch.equal(out, expected), f"{table.numel()} thresholds: {int((out != expected).sum())} differ"


def test_native_n2uq_non_finite_inputs_as_reference() -> None:
    """NaN takes the top code (bucketize's) and a zero input gradient; infinities clip; the width gradients are NaN
    in the same cells as the reference's."""
    assert native.library() is not None, native.failure()
    for bits in (4, 8):
        v = torch.randn(1000, generator=torch.Generator().manual_seed(bits))
        v[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
        upstream = torch.randn(1000, generator=torch.Generator().manual_seed(1))
        quantizer = build("n2uq", bits, False, "activation", torch.float32)
        with torch.no_grad():
            quantizer(v[4:])
        with dispatch.kernels("native"):
            fast = forward_backward(quantizer, v, upstream)
        with dispatch.kernels("reference"):
            reference = forward_backward(quantizer, v, upstream)
        assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1], reference[1])
        for key in reference[2]:
            torch.testing.assert_close(fast[2][key], reference[2][key], rtol=1e-4, atol=1e-4, equal_nan=True)
