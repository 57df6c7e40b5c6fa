"""Cross-checks of LSQ+, TQT, DSQ and DoReFa against ports of their reference forward and backward (written for these
tests from the canonical code named in shared/docs/quantizers-zoo.md: plain autograd with the references' own
straight-through tricks), on random inputs and on edge inputs (clip boundaries, rounding ties)."""

from __future__ import annotations

import math

import pytest
import torch

import quantizers

BITS = (2, 3, 4, 8)


def _grad_scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """lsq-net's grad_scale trick: forward x, gradient times scale."""
    return (x - x * scale).detach() + x * scale


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _codes(qn: int, qp: int, seed: int) -> torch.Tensor:
    """v/s values: random across and beyond the range, rounding ties, and the clip points themselves."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.empty(300, dtype=torch.float64).uniform_(-qn - 3, qp + 3, generator=generator)
    ties = torch.arange(-qn, qp, dtype=torch.float64) + 0.5
    return torch.cat([random, ties, torch.tensor([-qn, qp], dtype=torch.float64)])


# ---- LSQ+ (paper eq.; Bhalgat et al. 2020) --------------------------------------------------------------------------


def lsq_plus_reference(v, step, offset, qn, qp, g):
    step, offset = _grad_scaled(step, g), _grad_scaled(offset, g)
    return _ste_round(torch.clamp((v - offset) / step, -qn, qp)) * step + offset


def _lsq_plus_run(bits: int, signed: bool, v: torch.Tensor, upstream: torch.Tensor, step: float, offset: float):
    """(quantbench's output, input grad, step grad, offset grad), (the reference's, the same four)."""
    quantizer = quantizers.create("lsq_plus", bits=bits, signed=signed, learn_offset=True).double()
    quantizer.set_step(step)
    with torch.no_grad():
        quantizer.offset.fill_(offset)
    leaf = v.clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream).sum().backward()
    ref_v = v.clone().requires_grad_(True)
    ref_step = torch.tensor(step, dtype=torch.float64, requires_grad=True)
    ref_offset = torch.tensor(offset, dtype=torch.float64, requires_grad=True)
    g = 1 / math.sqrt(v.numel() * quantizer.qp)
    reference = lsq_plus_reference(ref_v, ref_step, ref_offset, quantizer.qn, quantizer.qp, g)
    (reference * upstream).sum().backward()
    ours = (output.detach(), leaf.grad, quantizer.step_size.grad, quantizer.offset.grad)
    return quantizer, ours, (reference.detach(), ref_v.grad, ref_step.grad, ref_offset.grad)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_plus_matches_reference(bits: int, signed: bool) -> None:
    step, offset = 0.375, -0.25  # exact binary fractions: v/s lands exactly on the clip points and ties
    probe = quantizers.create("lsq_plus", bits=bits, signed=signed)
    z = _codes(probe.qn, probe.qp, bits)
    boundary = (z == -probe.qn) | (z == probe.qp)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # everywhere but exactly at the clip points: same outputs, same gradients
    _, ours, reference = _lsq_plus_run(bits, signed, z[~boundary] * step + offset, upstream[~boundary], step, offset)
    assert torch.equal(ours[0], reference[0])
    for mine, theirs in zip(ours[1:], reference[1:]):
        assert torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12)
    # At v/s exactly -Q_N or Q_P the reference's result depends on torch.clamp's subgradient at its bound (which has
    # changed across torch versions); quantbench fixes the LSQ paper's strict interior there: no input gradient,
    # the clip code for the step and 1 for the offset (times g).
    quantizer, ours, reference = _lsq_plus_run(bits, signed, z * step + offset, upstream, step, offset)
    assert torch.equal(ours[0], reference[0])
    assert torch.equal(ours[1][boundary], torch.zeros(int(boundary.sum()), dtype=torch.float64))
    g = 1 / math.sqrt(z.numel() * quantizer.qp)
    clipped = (z <= -quantizer.qn) | (z >= quantizer.qp)
    assert ours[3].item() == pytest.approx(g * upstream[clipped].sum().item(), rel=1e-9)


def test_lsq_plus_init_rules() -> None:
    weights = torch.randn(64, 16, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.01
    quantizer = quantizers.create("lsq_plus", bits=4, signed=True)
    quantizer(weights)
    mean, std = weights.mean().item(), weights.std(unbiased=False).item()
    assert quantizer.current_step() == pytest.approx(max(abs(mean - 3 * std), abs(mean + 3 * std)) / 8, rel=1e-5)
    assert not hasattr(quantizer, "offset") and quantizer.options()["learn_offset"] is False
    activations = torch.rand(8, 4, 5, 5, generator=torch.Generator().manual_seed(1)) * 3 - 0.5
    act = quantizers.create("lsq_plus", bits=3, signed=False)
    output = act(activations)
    assert act.offset.item() == pytest.approx(activations.min().item())
    assert act.current_step() == pytest.approx((activations.max() - activations.min()).item() / 7, rel=1e-5)
    assert output.min().item() == pytest.approx(activations.min().item(), abs=1e-6)
    assert output.max().item() == pytest.approx(activations.max().item(), abs=1e-5)


# ---- TQT (ModelTC/MQBench mqbench/fake_quantize/tqt.py, its learned-threshold backward) -------------------------------


def tqt_reference_gradients(v, log2_threshold, qn, qp, divisor, upstream):
    """Forward and gradients as MQBench's FakeQuantizeTqtAffine (the 'param' rounding), with the paper's
    parameterization: the step gradient chained through s = 2^ceil(log2 t) / divisor with a straight-through ceil."""
    step = 2.0 ** math.ceil(log2_threshold) / divisor
    z = v / step
    rounded = torch.where((z < 0) & (z - torch.floor(z) == 0.5), torch.ceil(z), torch.round(z))
    below, above = rounded < -qn, rounded > qp
    inside = ~below & ~above
    output = torch.clamp(rounded, -qn, qp) * step
    grad_step = torch.where(inside, upstream * (rounded - z), torch.where(below, upstream * -qn, upstream * qp)).sum()
    grad_v = torch.where(inside, upstream, 0.0)
    return output, grad_v, grad_step * step * math.log(2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_tqt_matches_mqbench_including_the_half_step_bands(bits: int, signed: bool) -> None:
    """The default boundary is the canonical one: values that round into range are inside, so v/s in
    (Q_P, Q_P + 1/2) and (-Q_N - 1/2, -Q_N) get MQBench's input and threshold gradients (the band the old strict
    interior got wrong). Only negative ties differ (MQBench rounds them up, quantbench to even)."""
    quantizer = quantizers.create("tqt", bits=bits, signed=signed, grad_scale="none").double()
    quantizer.set_step(0.3)  # the step becomes 2^ceil(log2(0.3 * divisor)) / divisor
    step = quantizer.current_step()
    assert math.log2(step) == round(math.log2(step))  # a power of two
    z = torch.cat([_codes(quantizer.qn, quantizer.qp, bits),  # plus the bands just past each clip point
                   torch.tensor([quantizer.qp + 0.2, quantizer.qp + 0.45, -quantizer.qn - 0.2, -quantizer.qn - 0.45],
                                dtype=torch.float64)])
    v = z * step
    upstream = torch.randn(v.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    negative_tie = (z < 0) & (z - torch.floor(z) == 0.5)
    same = ~negative_tie
    leaf = v[same].clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream[same]).sum().backward()
    ref_out, ref_grad_v, ref_grad_log2 = tqt_reference_gradients(
        v[same], quantizer.log2_threshold.item(), quantizer.qn, quantizer.qp, quantizer.divisor, upstream[same])
    assert torch.equal(output.detach(), ref_out)
    assert torch.equal(leaf.grad, ref_grad_v)
    assert quantizer.log2_threshold.grad.item() == pytest.approx(float(ref_grad_log2), rel=1e-9, abs=1e-12)


def test_tqt_band_repro_gives_the_papers_values() -> None:
    """Issue 26's repro: v/s = 1.2 with Q_P = 1 rounds to 1, inside: input gradient 1, threshold gradient
    s ln2 (1 - 1.2) = 0.5 ln2 (-0.2) = -0.0693 (the strict interior gave 0.0 and 0.3466)."""
    q = quantizers.create("tqt", bits=2, signed=True, grad_scale="none").double()
    q.set_step(0.5)
    v = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    q(v).backward()
    assert v.grad.item() == 1.0
    assert q.log2_threshold.grad.item() == pytest.approx(0.5 * math.log(2) * (1 - 1.2), rel=1e-12)
    strict = quantizers.create("tqt", bits=2, signed=True, grad_scale="none", boundary="strict").double()
    strict.set_step(0.5)
    w = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    strict(w).backward()
    assert w.grad.item() == 0.0 and strict.log2_threshold.grad.item() == pytest.approx(0.5 * math.log(2))
    assert q.metadata()["boundary"] == "rounded" and strict.metadata()["boundary"] == "strict"  # recorded in runs


# ---- DSQ (ModelTC/MQBench mqbench/fake_quantize/dsq.py, dsq_function_per_tensor) -------------------------------------


def dsq_reference(v, scale, qn, qp, alpha):
    tanh_scale = 1 / (1 - alpha)
    sharpness = math.log((tanh_scale + 1) / (tanh_scale - 1))
    x = torch.clamp(v / scale, -qn, qp)
    x = x.floor() + tanh_scale * torch.tanh(sharpness * (x - x.floor() - 0.5)) * 0.5 + 0.5
    return _ste_round(x) * scale


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("alpha", [0.4, 0.1])
def test_dsq_matches_mqbench(bits: int, signed: bool, alpha: float) -> None:
    quantizer = quantizers.create("dsq", bits=bits, signed=signed, alpha=alpha, grad_scale="none").double()
    step = 0.375
    quantizer.set_step(step)
    v = _codes(quantizer.qn, quantizer.qp, bits) * step
    upstream = torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaf = v.clone().requires_grad_(True)
    output = quantizer(leaf)
    (output * upstream).sum().backward()
    ref_v = v.clone().requires_grad_(True)
    ref_step = torch.tensor(step, dtype=torch.float64, requires_grad=True)
    reference = dsq_reference(ref_v, ref_step, quantizer.qn, quantizer.qp, alpha)
    (reference * upstream).sum().backward()
    # forward: the hard staircase, identical (ties included: round(soft) == round(v/s) at every tie here)
    assert torch.equal(output.detach(), reference.detach())
    assert torch.equal(output.detach(), torch.clamp(torch.round(v / step), -quantizer.qn, quantizer.qp) * step)
    # backward: the soft function's derivative; MQBench's scale is an observer buffer, here it is differentiated as
    # the same expression would be (the reference's autograd w.r.t. its scale)
    assert torch.allclose(leaf.grad, ref_v.grad, rtol=1e-12, atol=1e-12)
    assert quantizer.step_size.grad.item() == pytest.approx(ref_step.grad.item(), rel=1e-9, abs=1e-9)


# ---- DoReFa (tensorpack DoReFa-Net; PACT paper's description of DoReFa activations) ----------------------------------


def dorefa_weight_reference(w, bits):
    n = 2**bits - 1
    t = torch.tanh(w)
    unit = t / (2 * t.abs().max()) + 0.5
    return 2 * (_ste_round(unit * n) / n) - 1


def dorefa_activation_reference(a, bits):
    n = 2**bits - 1
    return _ste_round(torch.clamp(a, 0, 1) * n) / n


@pytest.mark.parametrize("bits", BITS)
def test_dorefa_matches_reference(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    weights = torch.randn(200, generator=generator, dtype=torch.float64) * 0.3
    upstream = torch.randn(200, generator=generator, dtype=torch.float64)
    quantizer = quantizers.create("dorefa", bits=bits, signed=True, output_scale="none").double()
    leaf = weights.clone().requires_grad_(True)
    (quantizer(leaf) * upstream).sum().backward()
    ref = weights.clone().requires_grad_(True)
    reference = dorefa_weight_reference(ref, bits)
    (reference * upstream).sum().backward()
    assert torch.allclose(quantizer(weights), reference.detach(), atol=1e-12)
    assert torch.allclose(leaf.grad, ref.grad, rtol=1e-9, atol=1e-12)

    n = 2**bits - 1
    activations = torch.cat([torch.rand(300, generator=generator, dtype=torch.float64) * 1.6 - 0.3,
                             (torch.arange(n, dtype=torch.float64) + 0.5) / n])  # ties
    upstream = torch.randn(activations.shape, generator=generator, dtype=torch.float64)
    act = quantizers.create("dorefa", bits=bits, signed=False).double()
    leaf = activations.clone().requires_grad_(True)
    output = act(leaf)
    (output * upstream).sum().backward()
    ref = activations.clone().requires_grad_(True)
    reference = dorefa_activation_reference(ref, bits)
    (reference * upstream).sum().backward()
    assert act.scale.item() == 1.0  # the paper's clip: data-driven init leaves it at 1
    # Intended difference at rounding ties: the reference rounds a * n, the fused op (PACT's) a / (1/n); (k + 1/2)/n
    # is not exact in floating point, so the two may round a tie to different neighbours, never further apart.
    ties = torch.zeros(activations.shape, dtype=torch.bool)
    ties[300:] = True
    assert torch.allclose(output.detach()[~ties], reference.detach()[~ties], atol=1e-12)
    assert float((output.detach()[ties] - reference.detach()[ties]).abs().max()) <= 1 / n + 1e-12
    assert torch.allclose(leaf.grad, ref.grad, rtol=1e-12, atol=0)  # a == 1 exactly is absent here; there PACT's convention gives 0
