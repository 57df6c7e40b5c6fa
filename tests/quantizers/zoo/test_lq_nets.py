"""LQ-Nets against a port of microsoft/LQ-Nets learned_quantization.py (written for this test from the TensorFlow
``QuantizedWeight`` / ``QuantizedActiv``: level multipliers, sorted levels, thresholds, the ``x > thrs[i]`` loop, the
explicit B^T B / B^T x sums and the moving-average update), and the basis update as a training-loop hook."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantizers
from quantbench.training.quantizer_hooks import QuantizerHooks
from quantizers.lq_nets import code_table

MOVING_AVERAGES_FACTOR, EPS = 0.9, 1e-4


def reference_levels(basis: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """init_level_multiplier (bits of i, LSB first; 0 -> -1 for weights), levels = multipliers @ basis, sorted."""
    nbit = basis.shape[0]
    multipliers = []
    for i in range(2**nbit):
        row, number = [], i
        for _ in range(nbit):
            bit = float(number % 2)
            row.append(-1.0 if signed and bit == 0 else bit)
            number //= 2
        multipliers.append(row)
    codes = torch.tensor(multipliers, dtype=basis.dtype)
    levels, order = torch.sort(codes @ basis, dim=0)  # (levels, channels)
    return levels, codes[order] if basis.dim() == 1 else order


def reference_activation(x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantizedActiv for one basis (K,): the output loop and the bits of each element's level."""
    nbit = basis.shape[0]
    levels, bits_of_level = reference_levels(basis, signed=False)
    thresholds = [(levels[i] + levels[i + 1]) / 2 for i in range(2**nbit - 1)]
    y = torch.zeros_like(x)
    bits_y = torch.zeros(x.numel(), nbit, dtype=x.dtype)
    for i in range(2**nbit - 1):
        g = x > thresholds[i]
        y = torch.where(g, levels[i + 1], y)
        bits_y[g.reshape(-1)] = bits_of_level[i + 1]
    return y, bits_y


class AssignMovingAverage:
    """TensorFlow's ``moving_averages.assign_moving_average(variable, value, decay)`` with its default
    ``zero_debias=True`` (``_zero_debias``): a hidden ``biased`` variable from zeros and a ``local_step``;
    ``biased -= (biased - value) * (1 - decay)``, ``local_step += 1``, then the variable is set to
    ``biased / (1 - decay^local_step)``. ``zero_debias=False``: ``variable -= (variable - value) * (1 - decay)``."""

    def __init__(self, decay: float = MOVING_AVERAGES_FACTOR, zero_debias: bool = True) -> None:
        self.decay, self.zero_debias = decay, zero_debias
        self.biased: torch.Tensor | None = None
        self.local_step = 0

    def __call__(self, variable: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not self.zero_debias:
            return variable - (variable - value) * (1 - self.decay)
        if self.biased is None:
            self.biased = torch.zeros_like(value)
        self.biased = self.biased - (self.biased - value) * (1 - self.decay)
        self.local_step += 1
        return self.biased / (1 - self.decay**self.local_step)


def reference_activation_update(x: torch.Tensor, basis: torch.Tensor, average: AssignMovingAverage) -> torch.Tensor:
    """new_basis = (B^T B)^-1 B^T x, then assign_moving_average(basis, new, 0.9)."""
    _, bits = reference_activation(x, basis)
    btb = bits.T @ bits
    btx = bits.T @ x.reshape(-1)
    new = torch.linalg.inv(btb) @ btx
    return average(basis, new)


def reference_weight(w: torch.Tensor, basis: torch.Tensor,
                     average: AssignMovingAverage) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantizedWeight with channels first (the code's last axis) for basis (K, C): output and updated basis."""
    nbit, channels = basis.shape
    rows = w.reshape(channels, -1)
    outputs, new_basis = [], []
    for c in range(channels):
        levels, bits_of_level = reference_levels(basis[:, c], signed=True)
        thresholds = [(levels[i] + levels[i + 1]) / 2 for i in range(2**nbit - 1)]
        y = torch.full_like(rows[c], float(levels[0]))
        bits_y = bits_of_level[0].repeat(rows[c].numel(), 1)
        for i in range(2**nbit - 1):
            g = rows[c] > thresholds[i]
            y = torch.where(g, levels[i + 1], y)
            bits_y[g] = bits_of_level[i + 1]
        outputs.append(y)
        btb = bits_y.T @ bits_y + EPS * torch.eye(nbit, dtype=w.dtype)  # + E on the diagonal
        btx = bits_y.T @ rows[c] + EPS * basis[:, c]  # + delta * basis
        new_basis.append(torch.linalg.inv(btb) @ btx)
    return torch.stack(outputs).reshape(w.shape), average(basis, torch.stack(new_basis, dim=1))


@pytest.mark.parametrize("zero_debias", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_activations_and_their_basis_update_match_the_code(bits: int, zero_debias: bool) -> None:
    quantizer = quantizers.create("lq_nets", bits=bits, signed=False, ridge=0.0, zero_debias=zero_debias).double()
    average = AssignMovingAverage(zero_debias=zero_debias)
    generator = torch.Generator().manual_seed(bits)
    x = torch.relu(torch.randn(32, 16, generator=generator, dtype=torch.float64) + 0.3)
    quantizer.initialize(x)
    basis = quantizer.basis[0].clone()
    assert torch.allclose(basis, torch.tensor([0.6745 * 2 / (2**bits - 1) * 2**i for i in range(bits)],
                                              dtype=torch.float64) * (2 * (x * x).mean()).sqrt())
    for step in range(5):  # one update, then five: the zero-debiased average against the plain one
        leaf = x.clone().requires_grad_(True)
        output = quantizer(leaf)
        expected, _ = reference_activation(x, basis)
        assert torch.allclose(output.detach(), expected, rtol=0, atol=1e-12)
        output.sum().backward()  # the code's gradient: y = x_clip = min(x, top level)
        assert torch.equal(leaf.grad, (x <= quantizer.levels().max()).double())
        quantizer.after_step(step)
        basis = reference_activation_update(x, basis, average)
        assert torch.allclose(quantizer.basis[0], basis, rtol=1e-10, atol=1e-12)
        x = torch.relu(x + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("zero_debias", [True, False])
@pytest.mark.parametrize("bits", [2, 3])
def test_per_channel_weights_and_their_basis_update_match_the_code(bits: int, zero_debias: bool) -> None:
    quantizer = quantizers.create("lq_nets", bits=bits, signed=True, zero_debias=zero_debias).double()
    average = AssignMovingAverage(zero_debias=zero_debias)
    generator = torch.Generator().manual_seed(10 + bits)
    w = 0.1 * torch.randn(6, 3, 3, 3, generator=generator, dtype=torch.float64)
    quantizer.initialize(w)
    assert quantizer.basis.shape == (6, bits)
    basis = quantizer.basis.T.clone()  # the code's (K, C)
    for step in range(5):
        leaf = w.clone().requires_grad_(True)
        output = quantizer(leaf)
        expected, basis = reference_weight(w, basis, average)
        assert torch.allclose(output.detach(), expected, rtol=0, atol=1e-12)
        output.sum().backward()
        assert torch.equal(leaf.grad, torch.ones_like(w))  # y = x: straight through, unclipped
        quantizer.after_step(step)
        assert torch.allclose(quantizer.basis.T, basis, rtol=1e-9, atol=1e-12)
        w = w + 0.01 * torch.randn(w.shape, generator=generator, dtype=torch.float64)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(bits=st.integers(2, 5), signed=st.booleans(), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_the_update_never_increases_the_quantization_error_without_averaging(bits, signed, scale, seed) -> None:
    """With momentum 0 the update is the least-squares basis for the current codes: the error cannot grow (Lloyd)."""
    quantizer = quantizers.create("lq_nets", bits=bits, signed=signed, role="activation", momentum=0.0, ridge=0.0).double()
    x = scale * torch.randn(512, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x if signed else x.abs()
    quantizer.initialize(x)
    errors = []
    for step in range(3):
        errors.append(float(((quantizer(x.clone().requires_grad_(True)).detach() - x) ** 2).mean()))
        quantizer.after_step(step)
    assert all(later <= earlier * (1 + 1e-9) + 1e-300 for earlier, later in zip(errors, errors[1:])), errors


def test_no_training_forward_means_no_update_and_state_survives_a_reload() -> None:
    quantizer = quantizers.create("lq_nets", bits=3, signed=True)
    w = torch.randn(4, 8)
    with torch.no_grad():
        quantizer(w)  # initializes; no statistics without gradients
    before = quantizer.basis.clone()
    quantizer.after_step(0)
    assert torch.equal(quantizer.basis, before)
    quantizer(w.requires_grad_(True))
    quantizer.after_step(1)
    assert not torch.equal(quantizer.basis, before)
    reloaded = quantizers.create("lq_nets", bits=3, signed=True)
    reloaded.load_state_dict(quantizer.state_dict())  # (4, 3) bases into a fresh (1, 3) buffer
    assert torch.equal(reloaded.basis, quantizer.basis) and bool(reloaded.initialized)
    with torch.no_grad():
        assert torch.equal(reloaded(w), quantizer(w))


def test_set_step_places_a_uniform_grid_and_levels_match_the_code_table() -> None:
    unsigned = quantizers.create("lq_nets", bits=3, signed=False)
    unsigned.set_step(0.5)
    assert torch.allclose(unsigned.levels(), 0.5 * torch.arange(8.0))
    signed = quantizers.create("lq_nets", bits=2, signed=True)
    signed.set_step(0.5)
    assert torch.allclose(signed.levels(), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert code_table(2, True).tolist() == [[-1, -1], [1, -1], [-1, 1], [1, 1]]


def test_a_channel_count_mismatch_and_integer_export_fail_with_one_line() -> None:
    quantizer = quantizers.create("lq_nets", bits=2, signed=True)
    quantizer(torch.randn(4, 3))
    with pytest.raises(quantizers.QuantizerError, match="4 channel bases") as error:
        quantizer(torch.randn(5, 3))
    assert "\n" not in str(error.value)
    with pytest.raises(quantizers.QuantizerError, match="non-uniform"):
        quantizer.integer_spec()
    with pytest.raises(quantizers.QuantizerError, match="momentum"):
        quantizers.create("lq_nets", bits=2, signed=True, momentum=1.0)


def test_the_training_loop_hook_runs_the_update_each_step() -> None:
    model = torch.nn.Sequential(quantizers.create("lq_nets", bits=2, signed=False))
    hooks = QuantizerHooks(model, steps_per_epoch=3, epochs=1)
    assert hooks.stepped == [model[0]] and not hooks.staged
    x = torch.rand(64)
    bases = []
    for step in range(3):
        model(x.clone().requires_grad_(True))
        hooks.after_step(step)
        bases.append(model[0].basis.clone())
    assert not torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])


def test_issue_repro_the_first_update_sets_the_basis_to_the_fit() -> None:
    """With the code's zero-debiased average the initial basis stops counting after one update."""
    w = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = quantizers.create("lq_nets", bits=2, signed=True).double()
    q.initialize(w)
    q(w.clone().requires_grad_()).sum().backward()
    fit = q.fitted_basis(*q._stats, momentum=0.0)
    q.after_step(1)
    assert torch.allclose(q.basis, fit, rtol=1e-12, atol=0)
    assert q.metadata()["zero_debias"] is True
