"""NICE against a port of LsNatan/NICE (written for this test from quantize.py's ``basic_clamp``,
``quant_weight_wrpn_improved`` and ``add_improved_uni_noise``, and actquant.py's ``ActQuantBuffers`` / ``act_quant``),
with the noise drawn from the same seed; and its stages, driven by the training loop's Stage signal."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantizers
from quantbench.training.quantizer_hooks import QuantizerHooks
from quantizers.base import Stage


def reference_basic_clamp(x: torch.Tensor, std_weight_clamp: float = 3.45) -> torch.Tensor:
    mean_p, std_p = x.mean(), x.std()
    std_clamp = (mean_p > 0).double() * (mean_p + std_weight_clamp * std_p) + \
        (mean_p < 0).double() * (mean_p - std_weight_clamp * std_p)
    return abs(std_clamp)


def reference_quant_weight(x: torch.Tensor, clamp: float, bits: int) -> torch.Tensor:
    weight_max_int = 2 ** (bits - 1) - 1
    step = clamp / weight_max_int  # layer_basis = initial_clamp_value / weight_max_int, layer_b = 1
    x = torch.clamp(x, -weight_max_int * step, weight_max_int * step)
    weight_scale = weight_max_int / (weight_max_int * step)
    return (1 / weight_scale) * torch.round(x * weight_scale)


def reference_noise(x: torch.Tensor, clamp: float, bits: int, noise_mask: float) -> torch.Tensor:
    """add_improved_uni_noise's weight branch (improvment_to_bin False): uni_cdf, noise, clamp, uni_icdf, mask."""
    weight_max_int = 2 ** (bits - 1) - 1
    step = clamp / weight_max_int
    min_value, max_value = -weight_max_int * step, weight_max_int * step
    y_p = (x - min_value) / (max_value - min_value)
    noise_step = 1.0 / (2 ** (bits + 1) - 4)
    noise = y_p.clone().uniform_(-noise_step, noise_step)
    y_out_p = torch.clamp(y_p + noise, 0, 1) * (max_value - min_value) + min_value
    mask = torch.bernoulli(x.new(x.size()).fill_(noise_mask))
    return mask * y_out_p + (1 - mask) * reference_quant_weight(x, clamp, bits)


def reference_activation(x: torch.Tensor, clamp_val: torch.Tensor, bits: int, quantize: bool) -> torch.Tensor:
    """ActQuantBuffers.forward: act_clamp, then act_quant with a straight-through round when quantizing."""
    clamped = torch.relu(x) - torch.relu(x - torch.abs(clamp_val))
    if not quantize:
        return clamped
    act_scale = (2**bits - 1) / clamp_val
    rounded = clamped * act_scale + ((clamped * act_scale).round() - clamped * act_scale).detach()
    return rounded * 1 / act_scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_clamp_and_quantize_as_the_code(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    w = 0.05 * torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64) + 0.01
    quantizer = quantizers.create("nice", bits=bits, signed=True).double()
    leaf = w.clone().requires_grad_(True)
    output = quantizer(leaf)
    clamp = reference_basic_clamp(w)
    assert math.isclose(float(quantizer.clamp), float(clamp), rel_tol=1e-12)
    assert torch.allclose(output.detach(), reference_quant_weight(w, float(clamp), bits), rtol=0, atol=1e-15)
    output.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(w))  # the param.data swap: straight through, unclipped
    assert torch.unique(output.detach()).numel() <= 2 ** bits - 1


@pytest.mark.parametrize("bits", [2, 4])
def test_noise_injection_is_the_codes_with_the_same_random_draws(bits: int) -> None:
    generator = torch.Generator().manual_seed(20 + bits)
    w = 0.05 * torch.randn(16, 32, generator=generator, dtype=torch.float64)
    quantizer = quantizers.create("nice", bits=bits, signed=True, noise_mask=0.3).double()
    quantizer.initialize(w)
    quantizer.set_stage(Stage(step=0, total_steps=100, layer=0, layers=4))  # this layer's block is being trained
    assert quantizer.phase() == "noise"
    torch.manual_seed(7)
    output = quantizer(w)
    torch.manual_seed(7)
    expected = reference_noise(w, float(quantizer.clamp), bits, noise_mask=0.3)
    assert torch.equal(output.detach(), expected)
    on_grid = torch.isclose(output, reference_quant_weight(w, float(quantizer.clamp), bits), rtol=0, atol=1e-15)
    assert 0.55 < float(on_grid.double().mean()) < 0.85  # about 70% quantized, 30% noisy
    step = float(quantizer.clamp) / (2 ** (bits - 1) - 1)
    assert float((output - w.clamp(-float(quantizer.clamp), float(quantizer.clamp))).abs().max()) <= step / 2 + 1e-12
    quantizer.eval()
    assert torch.equal(quantizer(w), reference_quant_weight(w, float(quantizer.clamp), bits))  # evaluation: quantized


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_activations_clamp_quantize_and_train_the_clamp_as_the_code(bits: int) -> None:
    generator = torch.Generator().manual_seed(30 + bits)
    x = torch.randn(64, 8, generator=generator, dtype=torch.float64) * 2
    for stage, quantize in ((Stage(1, 1), True), (Stage(0, 100, layer=1, layers=4), False)):
        quantizer = quantizers.create("nice", bits=bits, signed=False).double()
        quantizer.initialize(torch.relu(x))
        relu = torch.relu(x)
        assert math.isclose(float(quantizer.clamp.detach()), float(relu.mean() + 5 * relu.std()), rel_tol=1e-12)
        quantizer.set_step(0.3)  # inside the data's range, so clamping matters
        quantizer.set_stage(stage)
        leaf = x.clone().requires_grad_(True)
        output = quantizer(leaf)
        upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        (output * upstream).sum().backward()
        ref_x = x.clone().requires_grad_(True)
        ref_clamp = quantizer.clamp.detach().clone().requires_grad_(True)
        reference = reference_activation(ref_x, ref_clamp, bits, quantize)
        (reference * upstream).sum().backward()
        assert torch.allclose(output.detach(), reference.detach(), rtol=0, atol=1e-12)
        assert torch.allclose(leaf.grad, ref_x.grad, rtol=0, atol=1e-12)
        assert torch.allclose(quantizer.clamp.grad, ref_clamp.grad, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layers=st.integers(1, 12), progress=st.floats(0.0, 1.0), fraction=st.floats(0.05, 1.0))
def test_stages_quantize_blocks_in_order_and_everything_after_the_staged_phase(layers, progress, fraction) -> None:
    """Before the staged phase ends: blocks before the current one quantized, the current one noisy (weights) or
    clamped (its output activations), later ones in full precision; after it and in evaluation: all quantized."""
    total = 1000
    step = min(total, int(progress * total))
    phases = []
    for layer in range(layers):
        quantizer = quantizers.create("nice", bits=4, signed=True, stage_fraction=fraction)
        quantizer.set_stage(Stage(step, total, layer=layer, layers=layers))
        phases.append(quantizer.phase())
    if step / total >= fraction:
        assert phases == ["quantized"] * layers
    else:
        current = math.floor(step / total / fraction * layers)
        assert phases == ["quantized"] * current + ["noise"] + ["float"] * (layers - current - 1)
        activation = quantizers.create("nice", bits=4, signed=False, stage_fraction=fraction)
        activation.set_stage(Stage(step, total, layer=min(current + 1, layers - 1), layers=layers))
        assert activation.phase() == ("noise" if current + 1 <= layers - 1 else "quantized")
    quantizer.eval()
    assert quantizer.phase() == "quantized"


def test_the_loop_gives_each_layer_its_position() -> None:
    from quantbench.qat import QuantConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    sample = torch.randn(2, 1, 8, 8)
    quantize_(model, QuantConfig("nice", 4, first_last_bits=8), sample)
    hooks = QuantizerHooks(model, steps_per_epoch=10, epochs=1)
    assert len(hooks.staged) == 6 and not hooks.stepped
    hooks.before_step(0)  # progress 0 of a 0.35 staged phase: block 0 is being trained
    weights = [layer.weight_quantizer for layer in (model[0], model[2], model[5])]
    assert [q.stage.layer for q in weights] == [0, 1, 2] and {q.stage.layers for q in weights} == {3}
    assert [q.phase() for q in weights] == ["noise", "float", "float"]
    hooks.before_step(2)  # progress 0.2 -> stage floor(0.2 / 0.35 * 3) = 1
    assert [q.phase() for q in weights] == ["quantized", "noise", "float"]
    hooks.before_step(9)
    assert [q.phase() for q in weights] == ["quantized"] * 3


def test_bad_options_fail_with_one_line() -> None:
    for option, value in (("noise_mask", 1.5), ("stage_fraction", -0.1), ("act_clamp_std", float("nan"))):
        with pytest.raises(quantizers.QuantizerError, match=option) as error:
            quantizers.create("nice", bits=4, signed=True, **{option: value})
        assert "\n" not in str(error.value)
