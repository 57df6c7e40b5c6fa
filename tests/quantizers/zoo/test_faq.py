"""FAQ: a fixed uniform quantizer whose step is a high percentile of |v| over Q_P, set once and never learned."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantizers
from quantizers.faq import percentile_of_magnitude


@settings(max_examples=30, deadline=None, derandomize=True)
@given(bits=st.sampled_from([2, 3, 4, 8]), signed=st.booleans(), percentile=st.floats(50.0, 100.0),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_the_step_is_the_percentile_of_the_magnitudes_over_qp(bits, signed, percentile, scale, seed) -> None:
    v = scale * torch.randn(2000, generator=torch.Generator().manual_seed(seed))
    quantizer = quantizers.create("faq", bits=bits, signed=signed, percentile=percentile)
    with torch.no_grad():
        output = quantizer(v)
    rank = max(1, math.ceil(percentile / 100 * v.numel()))  # nearest rank: the smallest value with >= p% at or below
    expected = float(torch.sort(v.abs()).values[rank - 1]) / quantizer.qp
    assert quantizer.current_step() == pytest.approx(expected, rel=1e-6)
    clipped = (v.abs() > quantizer.qp * quantizer.current_step()).double().mean()
    assert float(clipped) <= 1 - percentile / 100 + 1e-3  # at most the tail beyond the percentile is clipped
    assert torch.unique(output).numel() <= 2**bits


def test_percentile_100_is_the_max_and_nothing_is_learned() -> None:
    v = torch.randn(500)
    faq = quantizers.create("faq", bits=4, signed=True, percentile=100)
    fixed_max = quantizers.create("fixed", bits=4, signed=True, mode="max")
    with torch.no_grad():
        assert torch.equal(faq(v), fixed_max(v))
    assert faq.range_parameters() == {} and not list(faq.parameters())
    step = faq.current_step()
    with torch.no_grad():
        faq(10 * v)  # later data never moves the step
    assert faq.current_step() == step
    assert percentile_of_magnitude(torch.tensor([-3.0, 1.0, 2.0]), 50) == 2.0
    assert "percentile" in faq.metadata() and "unconfirmed" in faq.metadata()["range"]


def test_a_bad_percentile_fails_with_one_line() -> None:
    with pytest.raises(quantizers.QuantizerError, match="percentile must be in") as error:
        quantizers.create("faq", bits=4, signed=False, percentile=0)
    assert "\n" not in str(error.value)
