"""The quantizer contract in ``base.Quantizer``: set_step as a template, integer_spec on every built-in, options
declared once, initialization that waits for data, QIL's boundary convention, and compiled kernels that never crash."""

from __future__ import annotations

import warnings

import pytest
import torch

import quantizers
from quantizers import IntegerSpec, Quantizer, QuantizerError
from quantizers.kernels import dispatch

BUILTINS = ("lsq", "qil", "pact", "fixed")


class _NoMark(Quantizer):
    """A plugin written the old way: it overrides set_step and forgets mark_initialized()."""

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.register_buffer("step", torch.tensor(1.0))

    def apply_step(self, step: float) -> None:
        self.step.fill_(step)

    def quantize(self, v):
        return torch.clamp(torch.round(v / self.step), -self.qn, self.qp) * self.step

    def levels(self):
        return torch.arange(-self.qn, self.qp + 1) * self.step


@pytest.mark.parametrize("name", BUILTINS)
def test_set_step_validates_and_marks_initialized(name: str) -> None:
    quantizer = quantizers.create(name, bits=3, signed=False)
    with pytest.raises(QuantizerError, match="positive finite"):
        quantizer.set_step(-1.0)
    assert not bool(quantizer.initialized)
    quantizer.set_step(0.25)
    assert bool(quantizer.initialized) and quantizer._is_initialized


def test_an_old_style_set_step_still_marks_initialized_and_validates() -> None:
    quantizer = _NoMark(bits=2, signed=True)
    quantizer.set_step(0.5)
    assert bool(quantizer.initialized) and float(quantizer.step) == 0.5
    with pytest.raises(QuantizerError):
        quantizer.set_step(float("nan"))


@pytest.mark.parametrize("name", BUILTINS)
def test_an_empty_first_batch_does_not_initialize(name: str) -> None:
    quantizer = quantizers.create(name, bits=2, signed=False)
    out = quantizer(torch.empty(0, 3))
    assert out.shape == (0, 3) and not bool(quantizer.initialized)
    quantizer(torch.rand(64) * 4)
    assert bool(quantizer.initialized) and quantizer.current_step() > 1e-3


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("signed", [True, False])
def test_every_builtin_declares_its_integer_spec(name: str, signed: bool) -> None:
    quantizer = quantizers.create(name, bits=3, signed=signed)
    v = torch.randn(500)
    out = quantizer(v).detach().double()
    spec = quantizer.integer_spec()
    assert isinstance(spec, IntegerSpec) and type(quantizer).integer_spec is not Quantizer.integer_spec
    codes = out / spec.step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert int(codes.round().min()) >= spec.lo and int(codes.round().max()) <= spec.hi


def test_the_default_integer_spec_reads_levels_for_weights_and_refuses_activations() -> None:
    weights = _NoMark(bits=3, signed=True)
    weights.set_step(0.5)
    assert (weights.integer_spec().step, weights.integer_spec().lo, weights.integer_spec().hi) == (0.5, -4, 3)
    with pytest.raises(QuantizerError, match="integer_spec"):
        _NoMark(bits=3, signed=False).integer_spec()


@pytest.mark.parametrize("name", BUILTINS)
def test_options_round_trip_through_create(name: str) -> None:
    quantizer = quantizers.create(name, bits=4, signed=True)
    options = {k: v for k, v in quantizer.options().items() if k in quantizers.options_of(name)}
    assert set(options) == set(quantizers.options_of(name))
    again = quantizers.create(name, bits=4, signed=True, **options)
    assert again.options() == quantizer.options()


def test_a_bad_choice_is_one_line_naming_the_choices() -> None:
    with pytest.raises(QuantizerError, match=r"lsq grad_scale must be one of full, numel, none, got 'x'"):
        quantizers.create("lsq", bits=2, signed=False, grad_scale="x")


def test_qil_prunes_at_the_pruning_point_and_keeps_the_clipping_point_interior() -> None:
    quantizer = quantizers.create("qil", bits=2, signed=False)
    quantizer.set_step(1.0)  # c = d = 1.5: interval (0, 3]
    prune, clip, _ = (float(t.detach()) for t in quantizer.interval())
    for backend in ("native", "eager", "reference"):
        v = torch.tensor([prune, clip], requires_grad=True)
        with dispatch.kernels(backend):
            quantizer(v).sum().backward()
        assert v.grad[0] == 0, backend  # c - d: pruned, no gradient
        assert v.grad[1] != 0, backend  # c + d: interior, the transformer's gradient


@pytest.mark.usefixtures("fresh_kernel_cache")
def test_compiled_kernels_survive_many_bit_widths_signs_and_dtypes() -> None:
    """Twelve and more (bits, sign, dtype) variants in one process: never a recompile-limit crash."""
    combinations = [(bits, signed, dtype) for bits in (2, 3, 4, 5, 6, 8) for signed in (False, True)
                    for dtype in (torch.float32, torch.float64)]
    assert len(combinations) >= 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # where no compiler exists, the one fallback warning is expected
        for bits, signed, dtype in combinations:
            for name in ("lsq", "fixed"):
                quantizer = quantizers.create(name, bits=bits, signed=signed).to(dtype)
                v = (torch.randn(256, dtype=dtype) * 3).requires_grad_()
                with dispatch.kernels("compiled", min_numel=2):
                    out = quantizer(v)
                    out.backward(torch.ones_like(out))
                with dispatch.kernels("eager"):
                    expected = quantizer(v.detach())
                assert torch.equal(out.detach(), expected), (name, bits, signed, dtype)


def test_a_kernel_that_fails_after_compiling_falls_back_with_one_warning(monkeypatch, fresh_kernel_cache) -> None:
    calls = {"n": 0}

    def flaky_compile(fn, **kwargs):
        def run(*args):
            calls["n"] += 1
            if calls["n"] > 1:
                raise RuntimeError("FailOnRecompileLimitHit: recompile limit reached")
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    quantizer = quantizers.create("lsq", bits=4, signed=False)
    v = torch.rand(4096)
    with dispatch.kernels("compiled", min_numel=2):
        first = quantizer(v)
        with pytest.warns(RuntimeWarning, match="could not compile"):
            second = quantizer(v)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            third = quantizer(v)
    assert torch.equal(first, second) and torch.equal(second, third)
