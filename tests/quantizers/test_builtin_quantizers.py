"""Quantizer maths: the conformance kit on every registered quantizer, LSQ's equations, Figure 2 closed forms,
fixed-step reference values, and the interface's guarantees."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantizers
from quantizers.conformance import check_quantizer

BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("name", quantizers.available())
def test_conformance_kit_passes_for_every_registered_quantizer(name: str) -> None:
    report = check_quantizer(name, examples=10)
    assert {result.check for result in report.results} >= {"grid", "gradients", "extremes", "state-dict"}


@pytest.mark.slow
@pytest.mark.parametrize("name", quantizers.available())
def test_conformance_kit_passes_with_many_examples(name: str) -> None:
    """What ``quantbench check NAME`` runs (25 examples per check and configuration), deeper than the CI test."""
    check_quantizer(name, examples=25)


# ---- LSQ equations -------------------------------------------------------------------------------------------------


def eq3_step_gradient(v: torch.Tensor, step: float, qn: int, qp: int) -> torch.Tensor:
    """LSQ eq. 3 written out case by case, per element."""
    z = v / step
    return torch.where(z <= -qn, float(-qn), torch.where(z >= qp, float(qp), torch.round(z) - z))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("grad_scale", ["none", "numel", "full"])
def test_lsq_step_gradient_is_equation_3_times_g(bits: int, signed: bool, grad_scale: str) -> None:
    quantizer = quantizers.create("lsq", bits=bits, signed=signed, grad_scale=grad_scale).double()
    step = 0.375  # exactly representable, so the boundary codes below are exactly on the clip points
    quantizer.set_step(step)
    generator = torch.Generator().manual_seed(bits)
    z = torch.empty(500, dtype=torch.float64).uniform_(-quantizer.qn - 3, quantizer.qp + 3, generator=generator)
    # the boundaries themselves: eq. 3 gives the clip code there and eq. 5 gives 0
    z = torch.cat([z, torch.tensor([-quantizer.qn, quantizer.qp], dtype=torch.float64)])
    v = (z * step).requires_grad_(True)
    upstream = torch.randn(v.shape, generator=generator, dtype=torch.float64)
    (quantizer(v) * upstream).sum().backward()

    n, qp = v.numel(), quantizer.qp
    g = {"none": 1.0, "numel": 1 / math.sqrt(n), "full": 1 / math.sqrt(n * qp)}[grad_scale]
    expected_step = g * (upstream * eq3_step_gradient(v.detach(), step, quantizer.qn, qp)).sum()
    assert torch.allclose(quantizer.step_size.grad, expected_step, rtol=1e-12, atol=1e-12)
    inside = (z > -quantizer.qn) & (z < qp)
    assert torch.equal(v.grad, torch.where(inside, upstream, 0.0))  # eq. 5, strict interior


def test_lsq_boundary_convention_at_exact_clip_point() -> None:
    quantizer = quantizers.create("lsq", bits=2, signed=False, grad_scale="none")
    quantizer.set_step(1.0)
    v = torch.tensor([3.0, 3.3], requires_grad=True)
    quantizer(v).sum().backward()
    # paper: v/s = 3 is clipped (ds = Qp, dv = 0); torch's fused kernel would call 3.3 "inside"
    assert v.grad.tolist() == [0.0, 0.0]
    assert quantizer.step_size.grad.item() == pytest.approx(6.0)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    signed=st.booleans(),
    multiplier=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_gradient_scale_options_change_only_the_step_gradient(bits, signed, multiplier, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(4, 8, generator=generator)
    outputs, input_grads, step_grads = [], [], []
    for grad_scale in ("none", "numel", "full"):
        quantizer = quantizers.create("lsq", bits=bits, signed=signed, grad_scale=grad_scale, grad_scale_mult=multiplier)
        quantizer.set_step(0.3)
        leaf = v.clone().requires_grad_(True)
        output = quantizer(leaf)
        output.sum().backward()
        outputs.append(output.detach())
        input_grads.append(leaf.grad)
        step_grads.append(quantizer.step_size.grad.double())
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert all(torch.equal(input_grads[0], other) for other in input_grads[1:])
    n, qp = v.numel(), quantizers.create("lsq", bits=bits, signed=signed).qp
    unscaled = step_grads[0] / multiplier
    assert torch.allclose(step_grads[1], unscaled * multiplier / math.sqrt(n), rtol=1e-5, atol=1e-7)
    assert torch.allclose(step_grads[2], unscaled * multiplier / math.sqrt(n * qp), rtol=1e-5, atol=1e-7)


def test_lsq_activation_n_convention() -> None:
    batch = torch.rand(8, 3, 4, 4)
    per_batch = quantizers.create("lsq", bits=4, signed=False)
    per_sample = quantizers.create("lsq", bits=4, signed=False, activation_n="sample")
    per_batch(batch), per_sample(batch)
    assert (per_batch.last_n, per_sample.last_n) == (batch.numel(), 3 * 4 * 4)
    weights = quantizers.create("lsq", bits=4, signed=True, activation_n="sample")
    weights(torch.randn(8, 3, 3, 3))
    assert weights.last_n == 8 * 27  # weights always use their numel


def test_lsq_initializes_from_first_batch_with_paper_rule() -> None:
    v = torch.randn(1000) * 3
    for signed in (False, True):
        quantizer = quantizers.create("lsq", bits=3, signed=signed)
        quantizer(v)
        assert quantizer.step_size.item() == pytest.approx(2 * v.abs().mean().item() / math.sqrt(quantizer.qp))


def test_lsq_step_is_kept_positive() -> None:
    quantizer = quantizers.create("lsq", bits=2, signed=False)
    quantizer.set_step(0.5)
    with torch.no_grad():
        quantizer.step_size.fill_(-0.5)
    output = quantizer(torch.tensor([0.6, 2.0]))
    assert torch.equal(output, torch.tensor([0.5, 1.5]))


# ---- Figure 2 closed forms (spec section 5: s = 1, Qn = 0, Qp = 3, v in (0, 4)) -------------------------------------

FIGURE2_V = torch.tensor([0.1, 0.3, 0.7, 1.2, 1.4, 1.6, 2.2, 2.45, 2.55, 2.9, 3.2, 3.7], dtype=torch.float64)


def _value_and_param_grads(quantizer: quantizers.Quantizer, parameter: str) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, grads = [], []
    for value in FIGURE2_V:  # one element at a time: the gradient of each output alone
        quantizer.zero_grad()
        output = quantizer(value.reshape(1))
        output.sum().backward()
        outputs.append(output.item())
        grads.append(getattr(quantizer, parameter).grad.item())
    return torch.tensor(outputs, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


def test_figure2_closed_forms() -> None:
    staircase = torch.round(torch.clamp(FIGURE2_V, 0, 3))
    inside = FIGURE2_V < 3

    lsq = quantizers.create("lsq", bits=2, signed=False, grad_scale="none").double()
    lsq.set_step(1.0)
    output, grad = _value_and_param_grads(lsq, "step_size")
    assert torch.allclose(output, staircase)
    assert torch.allclose(grad, torch.where(inside, torch.round(FIGURE2_V) - FIGURE2_V, 3.0))

    qil = quantizers.create("qil", bits=2, signed=False, output_scale="normalized").double()
    qil.set_step(1.0)  # c = d = 1.5: pruning point 0, clipping point 3
    assert (qil.center.item(), qil.distance.item()) == (1.5, 1.5)
    output, grad = _value_and_param_grads(qil, "distance")
    assert torch.allclose(3 * output, staircase)  # the paper plots 3 * x_bar
    assert torch.allclose(grad, torch.where(inside, (1.5 - FIGURE2_V) / 4.5, 0.0))

    pact = quantizers.create("pact", bits=2, signed=False).double()
    pact.set_step(1.0)  # alpha = 3
    output, grad = _value_and_param_grads(pact, "alpha")
    assert torch.allclose(output, staircase)
    assert torch.allclose(grad, torch.where(inside, 0.0, 1.0).double())


def test_qil_default_output_is_at_input_scale() -> None:
    qil = quantizers.create("qil", bits=2, signed=False)
    qil.set_step(1.0)
    assert torch.allclose(qil(FIGURE2_V.float()), torch.round(torch.clamp(FIGURE2_V.float(), 0, 3)))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), step=st.floats(1e-3, 1e2), seed=st.integers(0, 2**16))
def test_all_quantizers_share_one_forward_at_the_same_unsigned_operating_point(bits, step, seed) -> None:
    v = torch.randn(200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * step * 2**bits / 4
    reference = None
    for name in ("lsq", "qil", "pact", "fixed"):
        quantizer = quantizers.create(name, bits=bits, signed=False).double()
        quantizer.set_step(step)
        output = quantizer(v)
        reference = output if reference is None else reference
        assert torch.allclose(output, reference, rtol=1e-9, atol=1e-9 * step), name


def test_pact_does_not_differentiate_alpha_inside_the_step() -> None:
    pact = quantizers.create("pact", bits=2, signed=False)
    pact.set_step(1.0)
    x = torch.tensor([0.2, 1.3, 2.6, 3.0, 5.0])
    pact(x).sum().backward()
    assert pact.alpha.grad.item() == 2.0  # only x >= alpha contributes, 1 each


def test_regularization_is_pact_l2_on_alpha_and_zero_elsewhere() -> None:
    pact = quantizers.create("pact", bits=4, signed=False, alpha_l2=0.01)
    pact.set_step(0.5)  # alpha = 7.5
    assert pact.regularization().item() == pytest.approx(0.01 * 7.5**2)
    for name in ("lsq", "qil", "fixed"):
        assert quantizers.create(name, bits=4, signed=False).regularization().item() == 0.0
    assert quantizers.create("pact", bits=4, signed=True).regularization().item() == 0.0  # DoReFa weights


def test_dorefa_weights_have_no_zero_level() -> None:
    dorefa = quantizers.create("pact", bits=2, signed=True, output_scale="none")
    output = dorefa(torch.randn(1000))
    assert sorted(set(torch.round(output * 3).tolist())) == [-3.0, -1.0, 1.0, 3.0]


# ---- fixed-step modes -------------------------------------------------------------------------------------------

# spec section 4.3, N(0,1) (signed) and ReLU(N(0,1)) (unsigned): MSE-optimal step per bit width
MSE_OPTIMAL = {(2, True): 1.049, (2, False): 0.651, (3, True): 0.603, (3, False): 0.354,
               (4, True): 0.339, (4, False): 0.194, (8, True): 0.031, (8, False): 0.017}  # fmt: skip


@pytest.mark.parametrize(("bits", "signed"), list(MSE_OPTIMAL))
def test_fixed_mse_step_matches_reference_table(bits: int, signed: bool) -> None:
    v = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    if not signed:
        v = torch.relu(v)
    quantizer = quantizers.create("fixed", bits=bits, signed=signed, mode="mse")
    quantizer(v)
    assert quantizer.current_step() == pytest.approx(MSE_OPTIMAL[(bits, signed)], rel=0.03)


def test_fixed_modes_and_frozen_step() -> None:
    v = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    maximum = quantizers.create("fixed", bits=4, signed=True, mode="max")
    maximum(v)
    assert maximum.current_step() == pytest.approx(v.abs().max().item() / 7)
    frozen = quantizers.create("fixed", bits=4, signed=True)
    frozen(v)
    assert frozen.current_step() == pytest.approx(2 * v.abs().mean().item() / math.sqrt(7), rel=1e-6)
    assert list(frozen.parameters()) == [] and frozen.range_parameters() == {}
    leaf = (v * 10).requires_grad_(True)
    frozen(leaf).sum().backward()  # straight-through inside, zero outside
    inside = (leaf / frozen.current_step() > -8) & (leaf / frozen.current_step() < 7)
    assert torch.equal(leaf.grad, inside.float())


# ---- interface guarantees ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lsq", "qil", "pact", "fixed"])
def test_reloaded_model_does_not_reinitialize(name: str) -> None:
    model = torch.nn.Sequential(quantizers.create(name, bits=3, signed=False))
    model(torch.rand(64))
    clone = torch.nn.Sequential(quantizers.create(name, bits=3, signed=False))
    clone.load_state_dict(model.state_dict())
    probe = torch.rand(64) * 100
    assert torch.equal(clone(probe), model(probe))
    assert "0.initialized" in model.state_dict()


def test_qn_qp_follow_the_paper() -> None:
    assert (quantizers.create("lsq", bits=2, signed=False).qn, quantizers.create("lsq", bits=2, signed=False).qp) == (0, 3)
    signed = quantizers.create("lsq", bits=2, signed=True)
    assert (signed.qn, signed.qp) == (2, 1)
    assert quantizers.create("lsq", bits=8, signed=True).qn == 128


def test_range_parameters_name_the_step_or_width() -> None:
    assert list(quantizers.create("lsq", bits=2, signed=False).range_parameters()) == ["step_size"]
    assert list(quantizers.create("qil", bits=2, signed=True).range_parameters()) == ["distance", "center", "gamma"]
    assert list(quantizers.create("qil", bits=2, signed=False).range_parameters()) == ["distance", "center"]
    assert list(quantizers.create("pact", bits=2, signed=False).range_parameters()) == ["alpha"]
    assert quantizers.create("pact", bits=2, signed=True).range_parameters() == {}
    assert isinstance(quantizers.create("lsq", bits=2, signed=False).step_size, torch.nn.Parameter)


def test_metadata_records_the_conventions() -> None:
    metadata = quantizers.create("lsq", bits=4, signed=False).metadata()
    assert metadata["quantizer"] == "lsq" and metadata["grad_scale"] == "full"
    assert metadata["activation_n"] == "batch" and "strict interior" in metadata["boundary"]
    assert quantizers.create("qil", bits=4, signed=False).metadata()["output_scale"] == "clip"
