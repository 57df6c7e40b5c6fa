"""The conformance kit's upstream-dependent surrogates (EWGS) and per-channel weight steps (lsq, fixed, lsq_plus)."""

from __future__ import annotations

import math

import pytest
import torch

import quantizers
from quantbench.config import parse_value
from quantizers.conformance import check_quantizer, run_checks
from quantizers.ewgs import EWGS
from tests.helpers import assert_one_line

NEW = ("lsq_plus", "dsq", "apot", "ewgs", "n2uq", "tqt", "dorefa")


def test_every_new_quantizer_is_registered_with_a_description() -> None:
    for name in NEW:
        assert quantizers.get(name).description and "\n" not in quantizers.get(name).description


def test_kit_checks_ewgs_against_its_upstream_dependent_surrogate() -> None:
    check_quantizer("ewgs", bits=(2, 4), examples=10, options={"delta": 0.3}, checks=("gradients",))


def test_kit_catches_a_sign_dependent_gradient_that_is_not_declared(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the declaration the kit records the surrogate with no upstream gradient (the plain STE), which a
    # sign-dependent backward with a large delta does not match: the kit must say so.
    monkeypatch.setattr(EWGS, "upstream_dependent_gradient", False)
    report = run_checks("ewgs", bits=(2,), examples=10, options={"delta": 0.3}, checks=("gradients",))
    assert not report.passed
    assert "autograd" in report.failures()[0].detail


def test_apot_grid_check_uses_its_own_non_uniform_levels() -> None:
    quantizer = quantizers.create("apot", bits=4, signed=False)
    quantizer.set_step(0.1)
    gaps = quantizer.levels()[1:] - quantizer.levels()[:-1]
    assert float(gaps.max() / gaps.min()) > 2  # non-uniform
    report = check_quantizer("apot", bits=(4,), examples=10, checks=("grid",))
    assert report.passed


# ---- per-channel weights ------------------------------------------------------------------------------------------


def _weights(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 3, 3, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 2.0, 6).reshape(
        6, 1, 1, 1).double()


@pytest.mark.parametrize("name", ["lsq", "lsq_plus"])
@pytest.mark.parametrize("channel_n", ["channel", "tensor"])
def test_per_channel_equals_a_per_tensor_quantizer_per_channel(name: str, channel_n: str) -> None:
    weights = _weights()
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    quantizer = quantizers.create(name, bits=3, signed=True, per_channel=True, channel_n=channel_n).double()
    leaf = weights.clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream).sum().backward()
    assert quantizer.step_size.shape == (6,)
    n = weights.numel() // 6 if channel_n == "channel" else weights.numel()
    assert quantizer.last_n == n
    for channel in range(6):
        single = quantizers.create(name, bits=3, signed=True, grad_scale="none").double()
        single.set_step(float(quantizer.step_size[channel].detach()))
        part = weights[channel].clone().requires_grad_(True)
        part_output = single(part)
        (part_output * upstream[channel]).sum().backward()
        assert torch.equal(output[channel].detach(), part_output.detach())
        assert torch.equal(leaf.grad[channel], part.grad)
        expected = single.step_size.grad.item() / math.sqrt(n * quantizer.qp)
        assert quantizer.step_size.grad[channel].item() == pytest.approx(expected, rel=1e-9)


def test_per_channel_init_is_lsq_rule_per_channel_and_reloads() -> None:
    weights = _weights().float()
    quantizer = quantizers.create("lsq", bits=4, signed=True, per_channel="true")  # the CLI's word works
    output = quantizer(weights)
    expected = 2 * weights.abs().flatten(1).mean(1) / math.sqrt(quantizer.qp)
    assert torch.allclose(quantizer.step_size.detach(), expected)
    assert quantizer.metadata()["per_channel"] is True and quantizer.metadata()["channel_n"] == "channel"
    clone = quantizers.create("lsq", bits=4, signed=True, per_channel=True)
    clone.load_state_dict(quantizer.state_dict())
    assert torch.equal(clone(weights), output)


@pytest.mark.parametrize("name,options", [("lsq", {}), ("fixed", {}), ("lsq_plus", {}), ("lsq_plus", {"init": "lsq"})])
def test_per_channel_integer_spec_has_one_step_per_output_channel(name: str, options: dict) -> None:
    weights = _weights().float()
    quantizer = quantizers.create(name, bits=4, signed=True, per_channel=True, **options)
    output = quantizer(weights).detach()
    spec = quantizer.integer_spec()
    steps = quantizer.step_size.detach().abs()
    # the float32 steps the forward divides by, exactly; weights only, so no activation requantizer
    assert spec.per_channel and spec.step == [float(step) for step in steps] and len(spec.step) == 6
    assert (spec.lo, spec.hi, spec.stride, spec.width) == (-8, 7, 1, None)
    codes = torch.round(output / steps.reshape(-1, 1, 1, 1))
    assert torch.equal(codes.float() * steps.reshape(-1, 1, 1, 1), output)  # code * s_c in float32: bit for bit
    assert int(codes.min()) >= spec.lo and int(codes.max()) <= spec.hi
    assert torch.equal(spec.steps(6), torch.tensor(spec.step, dtype=torch.float64))


def test_a_per_tensor_spec_is_unchanged_and_activations_keep_one_step() -> None:
    weights = quantizers.create("lsq", bits=4, signed=True)
    weights(_weights().float())
    spec = weights.integer_spec()
    assert isinstance(spec.step, float) and not spec.per_channel and spec.width == spec.step
    activation = quantizers.create("lsq", bits=4, signed=False, per_channel=True)
    activation(torch.rand(2, 3, 4, 4))
    assert not activation.integer_spec().per_channel and activation.integer_spec().width is not None


def test_integer_spec_step_forms() -> None:
    # a plugin may give a list, a tuple or a tensor of steps; one step stays a float
    assert quantizers.IntegerSpec((0.5, 0.25), -2, 1).step == [0.5, 0.25]
    assert quantizers.IntegerSpec(torch.tensor([0.5, 0.25]), -2, 1).step == [0.5, 0.25]
    assert quantizers.IntegerSpec(torch.tensor(0.5), -2, 1, width=0.5).step == 0.5
    with pytest.raises(quantizers.QuantizerError) as error:
        quantizers.IntegerSpec([0.5, 0.25], 0, 3, width=0.5)
    assert_one_line(error.value, "per-channel", "weights only")
    with pytest.raises(quantizers.QuantizerError) as error:
        quantizers.IntegerSpec([0.5, 0.0], -2, 1)
    assert_one_line(error.value, "positive and finite")
    with pytest.raises(quantizers.QuantizerError) as error:
        quantizers.IntegerSpec([0.5, 0.25], -2, 1).steps(3)
    assert_one_line(error.value, "2 per-channel steps", "3 output")


@pytest.mark.parametrize("bits", [2, 4])
def test_n2uq_weights_are_odd_codes_times_one_unit_per_channel(bits: int) -> None:
    weights = _weights().float()
    quantizer = quantizers.create("n2uq", bits=bits, signed=True, role="weight")
    output = quantizer(weights).detach()
    spec = quantizer.integer_spec()
    n = 2**bits - 1
    assert (spec.lo, spec.hi, spec.stride) == (-n, n, 2) and spec.per_channel
    scale = quantizer.gamma * weights.abs().flatten(1).mean(1)
    assert spec.step == pytest.approx((scale / n).tolist(), rel=1e-6)
    units = torch.tensor(spec.step, dtype=torch.float64).reshape(-1, 1, 1, 1)
    codes = torch.round(output.double() / units)
    assert bool((codes.remainder(2) == 1).all()) and int(codes.abs().max()) <= n  # odd codes in [-n, n]
    torch.testing.assert_close(codes * units, output.double(), rtol=1e-6, atol=0.0)


def test_per_channel_is_a_weight_option_only() -> None:
    activation = quantizers.create("lsq", bits=4, signed=False, per_channel=True)
    activation(torch.rand(2, 3, 4, 4))
    assert activation.step_size.dim() == 0 and activation.options()["per_channel"] is False
    with pytest.raises(quantizers.QuantizerError) as error:
        quantizers.create("lsq", bits=4, signed=True, per_channel="yes")
    assert_one_line(error.value, "per_channel must be one of")
    assert parse_value("true") == "true"  # the CLI hands the word over; the quantizer reads it as a boolean


@pytest.mark.parametrize("mode", ["lsq-init", "max", "mse"])
def test_fixed_per_channel_sets_each_channel_by_its_mode(mode: str) -> None:
    weights = _weights().float()
    quantizer = quantizers.create("fixed", bits=4, signed=True, per_channel=True, mode=mode)
    quantizer(weights)
    for channel in range(6):
        single = quantizers.create("fixed", bits=4, signed=True, mode=mode)
        single(weights[channel])
        assert quantizer.step_size[channel].item() == pytest.approx(single.current_step(), rel=1e-6)


def test_a_per_channel_quantizer_refuses_a_tensor_with_other_channels() -> None:
    quantizer = quantizers.create("lsq", bits=4, signed=True, per_channel=True)
    quantizer(_weights().float())
    with pytest.raises(quantizers.QuantizerError) as error:
        quantizer(torch.randn(5, 3, 3, 3))
    assert_one_line(error.value, "6 channel steps", "5 output channels")


@pytest.mark.parametrize("name", ["lsq", "fixed", "lsq_plus"])
def test_conformance_kit_passes_per_channel(name: str) -> None:
    check_quantizer(name, bits=(2, 4), examples=6, options={"per_channel": True})
