"""Cross-checks of APoT, N2UQ and EWGS against ports of their canonical code's forward and backward (written for these
tests from yhhhli/APoT_Quantization, liuzechun/Nonuniform-to-Uniform-Quantization and cvlab-yonsei/EWGS)."""

from __future__ import annotations

import pytest
import torch

import quantizers
from quantizers.apot import power_levels


# ---- APoT: build_power_value and apot_quantization ------------------------------------------------------------------


def apot_reference_levels(magnitude_bits: int) -> list[float]:
    """build_power_value(B, additive=True), rewritten: the additive terms per width, their sums, normalized."""
    first, second, third = [0.0], [0.0], [0.0]
    for i in range(3):
        if magnitude_bits == 2:
            first.append(2.0 ** (-i - 1))
        elif magnitude_bits == 4:
            first.append(2.0 ** (-2 * i - 1))
            second.append(2.0 ** (-2 * i - 2))
        elif magnitude_bits == 6:
            first.append(2.0 ** (-3 * i - 1))
            second.append(2.0 ** (-3 * i - 2))
            third.append(2.0 ** (-3 * i - 3))
        elif magnitude_bits == 3:
            if i < 2:
                first.append(2.0 ** (-i - 1))
            else:
                second.append(2.0 ** (-i - 1))
                first.append(2.0 ** (-i - 2))
        elif magnitude_bits == 5:
            if i < 2:
                first.append(2.0 ** (-2 * i - 1))
                second.append(2.0 ** (-2 * i - 2))
            else:
                third.append(2.0 ** (-2 * i - 1))
                first.append(2.0 ** (-2 * i - 2))
                second.append(2.0 ** (-2 * i - 3))
    sums = sorted({a + b + c for a in first for b in second for c in third})
    return [value / max(sums) for value in sums]


def apot_reference(v, alpha, levels, is_weight):
    """apot_quantization: clip v/alpha, nearest level (sign kept for weights), straight-through, times alpha."""
    data = (v / alpha).clamp(-1 if is_weight else 0, 1)
    magnitude = data.abs() if is_weight else data
    index = (magnitude.reshape(1, -1) - levels.unsqueeze(1)).abs().min(dim=0)[1]
    hard = levels[index].reshape(data.shape) * (data.sign() if is_weight else 1)
    return ((hard - data).detach() + data) * alpha


@pytest.mark.parametrize("magnitude_bits", [2, 3, 4, 5, 6])
def test_apot_levels_are_the_canonical_sets(magnitude_bits: int) -> None:
    assert power_levels(magnitude_bits) == apot_reference_levels(magnitude_bits)
    assert len(power_levels(magnitude_bits)) == 2**magnitude_bits


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
@pytest.mark.parametrize("signed", [False, True])
def test_apot_matches_reference(bits: int, signed: bool) -> None:
    quantizer = quantizers.create("apot", bits=bits, signed=signed, weight_norm="none").double()
    quantizer.set_step(0.5)
    alpha = quantizer.alpha.item()
    magnitudes = torch.tensor(apot_reference_levels(quantizer.magnitude_bits), dtype=torch.float64)
    generator = torch.Generator().manual_seed(bits)
    v = torch.randn(400, generator=generator, dtype=torch.float64) * alpha * 0.6
    v = torch.cat([v, torch.tensor([alpha, -alpha, 0.0, 2 * alpha], dtype=torch.float64)])  # clip points, zero
    upstream = torch.randn(v.shape, generator=generator, dtype=torch.float64)
    leaf = v.clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream).sum().backward()
    ref_v = v.clone().requires_grad_(True)
    ref_alpha = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    reference = apot_reference(ref_v, ref_alpha, magnitudes, is_weight=signed)
    (reference * upstream).sum().backward()
    assert torch.allclose(output.detach(), reference.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(leaf.grad, ref_v.grad, rtol=1e-12, atol=1e-12)
    assert quantizer.alpha.grad.item() == pytest.approx(ref_alpha.grad.item(), rel=1e-9, abs=1e-12)


def test_apot_weights_are_standardized_then_rescaled_and_refuse_integer_export() -> None:
    weights = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05 + 0.01
    quantizer = quantizers.create("apot", bits=4, signed=True).double()
    output = quantizer(weights)
    assert quantizer.alpha.item() == 3.0  # the code's weight init, in std units
    std = weights.std()
    magnitudes = torch.tensor(apot_reference_levels(3), dtype=torch.float64)
    expected = apot_reference((weights - weights.mean()) / std, torch.tensor(3.0, dtype=torch.float64), magnitudes, True)
    # quantbench's departure: the code feeds the standardized value on; quantbench multiplies by std(w) at init
    assert torch.allclose(output, expected * quantizer.weight_scale, atol=1e-12)
    assert quantizer.weight_scale.item() == pytest.approx(std.item(), rel=1e-6)
    with pytest.raises(quantizers.QuantizerError, match="non-uniform") as error:
        quantizer.integer_spec()
    assert "\n" not in str(error.value)


# ---- N2UQ: LTQ (activations) and HardQuantizeConv (weights) -----------------------------------------------------------


def ltq_reference(x, start, widths, scale2, bits, eps=1e-3):
    """LTQ.forward with scale1 = 1, rewritten: forward thresholds at cell midpoints, piecewise-linear backward."""
    cells = 2**bits - 1
    interval = 2.0 / cells
    widths = torch.where(widths > eps, widths, torch.full_like(widths, eps))
    forward = torch.zeros_like(x)
    backward = torch.zeros_like(x)
    level = 0.0
    for i in range(cells):
        level += interval
        if i == 0:
            threshold_forward = start + widths[0] / 2
            threshold_backward = start + 0.0
        else:
            threshold_forward = threshold_forward + widths[i - 1] / 2 + widths[i] / 2
            threshold_backward = threshold_backward + widths[i - 1]
        forward = torch.where(x > threshold_forward, torch.full_like(x, level), forward)
        backward = torch.where(x > threshold_backward, interval / widths[i] * (x - threshold_backward) + level - interval,
                               backward)
    threshold_backward = threshold_backward + widths[cells - 1]
    backward = torch.where(x > threshold_backward, torch.full_like(x, 2.0), backward)
    return (forward.detach() + backward - backward.detach()) * scale2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_n2uq_activations_match_ltq(bits: int) -> None:
    quantizer = quantizers.create("n2uq", bits=bits, signed=False, init="code", min_width=1e-3).double()
    quantizer(torch.ones(4, dtype=torch.float64))  # init: start 0, widths 2/n, out_step 2/n
    generator = torch.Generator().manual_seed(bits)
    with torch.no_grad():  # non-uniform cells
        quantizer.widths.mul_(torch.rand(quantizer.cells, generator=generator, dtype=torch.float64) + 0.5)
        quantizer.start.fill_(0.1)
    x = torch.rand(500, generator=generator, dtype=torch.float64) * 2.6 - 0.3
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream).sum().backward()
    interval = 2.0 / quantizer.cells
    ref_x = x.clone().requires_grad_(True)
    ref_start = quantizer.start.detach().clone().requires_grad_(True)
    ref_widths = quantizer.widths.detach().clone().requires_grad_(True)
    ref_scale2 = torch.tensor(quantizer.out_step.item() / interval, dtype=torch.float64, requires_grad=True)
    reference = ltq_reference(ref_x, ref_start, ref_widths, ref_scale2, bits)
    (reference * upstream).sum().backward()
    assert torch.allclose(output.detach(), reference.detach(), atol=1e-12)
    assert torch.allclose(leaf.grad, ref_x.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(quantizer.widths.grad, ref_widths.grad, rtol=1e-9, atol=1e-12)
    assert quantizer.start.grad.item() == pytest.approx(ref_start.grad.item(), rel=1e-9, abs=1e-12)
    # one parameter out_step = scale2 * interval: its gradient is scale2's divided by the interval
    assert quantizer.out_step.grad.item() == pytest.approx(ref_scale2.grad.item() / interval, rel=1e-9)


def hard_quantize_conv_reference(weights, bits, clip_val=2.0):
    """HardQuantizeConv's weight quantization, rewritten (gradient reaches the weights through w / sf)."""
    gamma = (2**bits - 1) / 2 ** (bits - 1)
    scale = (gamma * weights.abs().mean(dim=(1, 2, 3), keepdim=True)).detach()
    scaled = weights / scale
    clipped = scaled.clamp(-clip_val / 2, clip_val / 2)
    n = (2**bits - 1) / clip_val
    hard = scale * (torch.round((clipped + clip_val / 2) * n) / n - clip_val / 2)
    return hard.detach() - scaled.detach() + scaled, scale


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_n2uq_weights_match_hard_quantize_conv(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    weights = torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64) * 0.1
    upstream = torch.randn(weights.shape, generator=generator, dtype=torch.float64)
    quantizer = quantizers.create("n2uq", bits=bits, signed=True).double()
    leaf = weights.clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream).sum().backward()
    ref_w = weights.clone().requires_grad_(True)
    reference, scale = hard_quantize_conv_reference(ref_w, bits)
    (reference * upstream).sum().backward()
    # forward: the code passes the *scaled* weight's gradient and adds it to a value at the weights' scale; its
    # forward value is the hard-quantized weight, which quantbench reproduces
    hard = reference.detach() - (ref_w.detach() / scale) + ref_w.detach() / scale
    assert torch.allclose(output.detach(), hard, atol=1e-12)
    # Intended difference: the code's weight gradient is upstream / sf per channel; quantbench's is upstream (STE)
    assert torch.allclose(leaf.grad, ref_w.grad * scale, rtol=1e-12, atol=1e-15)
    assert torch.equal(leaf.grad, upstream)


# ---- EWGS: EWGS_discretizer, weight_quantization, act_quantization ------------------------------------------------


class EWGSReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_in, num_levels, delta):
        x_out = torch.round(x_in * (num_levels - 1)) / (num_levels - 1)
        ctx.delta = delta
        ctx.save_for_backward(x_in - x_out)
        return x_out

    @staticmethod
    def backward(ctx, grad):
        (difference,) = ctx.saved_tensors
        return grad * (1 + ctx.delta * torch.sign(grad) * difference), None, None


def ewgs_reference(v, lower, upper, levels, delta, is_weight):
    x = ((v - lower) / (upper - lower)).clamp(0, 1)
    x = EWGSReference.apply(x, levels, delta)
    return (x - 0.5) * 2 if is_weight else x


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("delta", [0.0, 1e-3, 0.3])
def test_ewgs_matches_reference(bits: int, signed: bool, delta: float) -> None:
    generator = torch.Generator().manual_seed(bits)
    v = torch.randn(500, generator=generator, dtype=torch.float64)
    if not signed:
        v = v.relu()
    upstream = torch.randn(v.shape, generator=generator, dtype=torch.float64)
    quantizer = quantizers.create("ewgs", bits=bits, signed=signed, delta=delta, output_scale="normalized",
                                  grad_scale="none").double()
    quantizer(v)  # the code's init from this tensor
    leaf = v.clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream).sum().backward()
    lower = quantizer.lower.detach().clone().requires_grad_(True)
    upper = quantizer.upper.detach().clone().requires_grad_(True)
    ref_v = v.clone().requires_grad_(True)
    reference = ewgs_reference(ref_v, lower, upper, 2**bits, delta, is_weight=quantizer.role == "weight")
    (reference * upstream).sum().backward()
    assert torch.allclose(output.detach(), reference.detach(), atol=1e-12)
    assert torch.allclose(leaf.grad, ref_v.grad, rtol=1e-9, atol=1e-12)
    assert quantizer.lower.grad.item() == pytest.approx(lower.grad.item(), rel=1e-9, abs=1e-12)
    assert quantizer.upper.grad.item() == pytest.approx(upper.grad.item(), rel=1e-9, abs=1e-12)


def test_ewgs_init_follows_the_code() -> None:
    weights = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    quantizer = quantizers.create("ewgs", bits=2, signed=True)
    quantizer(weights)
    assert quantizer.upper.item() == pytest.approx(3 * weights.std().item(), rel=1e-5)
    assert quantizer.lower.item() == pytest.approx(-3 * weights.std().item(), rel=1e-5)
    activations = weights.relu()
    act = quantizers.create("ewgs", bits=2, signed=False)
    act(activations)
    assert act.upper.item() == pytest.approx(3 * activations.std().item() / (1 - 2 / torch.pi) ** 0.5, rel=1e-5)
    assert act.lower.item() == 0.0
