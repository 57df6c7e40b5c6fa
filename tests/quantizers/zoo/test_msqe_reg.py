"""msqe_reg (closest reading of Choi et al. 2018): the annealed MSQE regularizer, its learned step, the soft then
hard forward driven by the training loop's Stage signal, and the regularizer reaching the loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantizers
from quantbench.qat import regularization
from quantizers.base import Stage


def test_the_coefficient_rises_over_the_soft_phase_then_stays() -> None:
    quantizer = quantizers.create("msqe_reg", bits=2, signed=True, reg_weight=0.4, soft_fraction=0.5)
    values = []
    for step in (0, 25, 50, 75, 100):
        quantizer.set_stage(Stage(step, 100))
        values.append(quantizer.coefficient())
    assert values == pytest.approx([0.0, 0.2, 0.4, 0.4, 0.4])
    assert quantizers.create("msqe_reg", bits=2, signed=True, soft_fraction=0.0).coefficient() == 0.1


def test_soft_phase_is_full_precision_then_hard_and_evaluation_is_always_hard() -> None:
    v = torch.randn(100)
    quantizer = quantizers.create("msqe_reg", bits=2, signed=True, soft_fraction=0.5)
    quantizer.set_stage(Stage(10, 100))
    assert torch.equal(quantizer(v), v)
    quantizer.eval()
    hard = quantizer(v)
    assert torch.unique(hard).numel() <= 4
    quantizer.train()
    quantizer.set_stage(Stage(60, 100))
    assert torch.equal(quantizer(v), hard)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(bits=st.sampled_from([2, 3, 4]), scale=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16))
def test_the_regularizer_is_the_normalized_msqe_and_fits_the_step_by_least_squares(bits, scale, seed) -> None:
    v = scale * torch.randn(300, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    quantizer = quantizers.create("msqe_reg", bits=bits, signed=True, reg_weight=2.0, soft_fraction=0.0).double()
    quantizer.set_step(float(v.abs().max()) / quantizer.qp / 2)
    quantizer.set_stage(Stage(5, 10))
    leaf = v.clone().requires_grad_(True)
    output = quantizer(leaf)
    term = quantizer.regularization()
    step = float(quantizer.step_size.detach())
    codes = torch.clamp(torch.round(v / step), -quantizer.qn, quantizer.qp)
    expected = 2.0 * ((v - codes * step) ** 2).mean() / (v**2).mean()
    assert float(term.detach()) == pytest.approx(float(expected), rel=1e-9)
    term.backward()
    # d/ds of mean((v - c s)^2): -2 mean(c (v - c s)), normalized: zero at the least-squares step <c, v> / <c, c>
    grad_s = float(2.0 * -2 * (codes * (v - codes * step)).mean() / (v**2).mean())
    assert float(quantizer.step_size.grad) == pytest.approx(grad_s, rel=1e-9, abs=1e-12)
    assert torch.allclose(leaf.grad, 2.0 * 2 * (v - codes * step) / v.numel() / (v**2).mean())
    assert quantizer.regularization().item() == 0.0  # consumed: one term per training forward
    output.sum().backward()
    assert float(quantizer.step_size.grad) == pytest.approx(grad_s, rel=1e-9, abs=1e-12)  # the task loss adds none


def test_the_loop_adds_the_term_and_a_new_step_drops_an_old_input() -> None:
    model = torch.nn.Sequential(quantizers.create("msqe_reg", bits=2, signed=True, soft_fraction=0.0))
    v = torch.randn(64, requires_grad=True)
    model(v)
    assert float(regularization(model).detach()) > 0
    model(v)
    model[0].set_stage(Stage(1, 10))  # the loop's next step starts: the previous graph's input is dropped
    term = regularization(model)
    assert float(term.detach()) == 0.0 and term.requires_grad  # still in the graph: every parameter gets a gradient (DDP)


def test_bad_options_fail_with_one_line() -> None:
    for option, value in (("reg_weight", -1.0), ("soft_fraction", 1.0)):
        with pytest.raises(quantizers.QuantizerError, match=option) as error:
            quantizers.create("msqe_reg", bits=2, signed=True, **{option: value})
        assert "\n" not in str(error.value)
