"""The conformance kit's checks, one function each, and the hypothesis strategies they draw from (see
:mod:`quantizers.conformance` for what each check asserts and how the kit runs them)."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import quantizers
from quantizers.base import option_names
from quantizers import Quantizer, record_surrogate, replay_surrogate
from quantizers.ste import SurrogateTape

from .conformance_report import CheckResult

DEFAULT_BITS = (2, 3, 4, 8)
#: (signed, role) pairs a model uses: signed weights, unsigned post-ReLU activations, the signed image input
ROLE_CONFIGS = ((True, "weight"), (False, "activation"), (True, "activation"))
TIE_MARGIN = 0.05  # generated v/step stay this far (in steps) from rounding ties and integers (clip edges)


# ---- helpers ----------------------------------------------------------------------------------------------------

Factory = Callable[..., Quantizer]


def _factory(name: str, options: dict[str, Any]) -> Factory:
    def build(bits: int, signed: bool, role: str) -> Quantizer:
        default_role = "weight" if signed else "activation"
        extra = {} if role == default_role else {"role": role}
        return quantizers.create(name, bits=bits, signed=signed, **extra, **options)

    return build


def _learnable(quantizer: Quantizer) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in quantizer.named_parameters() if parameter.requires_grad]


def _codes(draw: Any, quantizer: Quantizer, count: int) -> torch.Tensor:
    """v/step values: integers across (and beyond) the code range plus offsets away from ties and integers."""
    low, high = -quantizer.qn, quantizer.qp
    near_edges = st.sampled_from([low - 2, low - 1, low, low + 1, high - 1, high, high + 1, high + 2])
    integers = draw(st.lists(st.one_of(st.integers(low - 3, high + 3), near_edges), min_size=count, max_size=count))
    offsets = draw(
        st.lists(
            st.floats(TIE_MARGIN, 0.5 - TIE_MARGIN).flatmap(lambda x: st.sampled_from([x, -x])),
            min_size=count,
            max_size=count,
        )
    )
    # A distinct tiny shift per element: no two values share a magnitude, so max-based quantizers (DoReFa's
    # max|tanh w|) are never evaluated on a tie, a kink where autograd splits the gradient between the tied elements.
    distinct = 1e-3 * torch.arange(1, count + 1, dtype=torch.float64) / count
    return torch.tensor(integers, dtype=torch.float64) + torch.tensor(offsets, dtype=torch.float64) + distinct


def _steps() -> st.SearchStrategy[float]:
    return st.floats(-3.0, 2.0).map(lambda exponent: 10.0**exponent)


def _run_property(check: str, bits: int, signed: bool, role: str, examples: int, body: Callable[[Any], None]) -> CheckResult:
    counter = {"n": 0}

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: report the first failure, fast
    )
    @given(st.data())
    def prop(data: Any) -> None:
        counter["n"] += 1
        body(data)

    try:
        prop()
    except NotApplicable as reason:
        return CheckResult(check, bits, signed, role, "n/a", str(reason))
    except Exception as error:  # noqa: BLE001 - report any failure of a user's quantizer as a failed check
        return CheckResult(check, bits, signed, role, "fail", _one_line(error), counter["n"])
    return CheckResult(check, bits, signed, role, "pass", "", counter["n"])


def _run_once(check: str, bits: int, signed: bool, role: str, body: Callable[[], None]) -> CheckResult:
    try:
        body()
    except NotApplicable as reason:
        return CheckResult(check, bits, signed, role, "n/a", str(reason))
    except Exception as error:  # noqa: BLE001
        return CheckResult(check, bits, signed, role, "fail", _one_line(error))
    return CheckResult(check, bits, signed, role, "pass")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class NotApplicable(Exception):
    """Raised by a check that does not apply to this quantizer (the reason is reported)."""


# ---- the checks ---------------------------------------------------------------------------------------------------


def _check_grid(build: Factory, bits: int, signed: bool, role: str) -> Callable[[Any], None]:
    def body(data: Any) -> None:
        quantizer = build(bits, signed, role)
        step = data.draw(_steps(), label="step")
        quantizer.set_step(step)
        count = data.draw(st.integers(1, 64), label="n")
        values = (_codes(data.draw, quantizer, count) * step).float()
        with torch.no_grad():
            output = quantizer(values)
        levels = quantizer.levels().detach().float().flatten()
        assert levels.numel() <= 2**bits, f"levels() has {levels.numel()} values, more than 2^{bits}"
        distinct = torch.unique(output).numel()
        assert distinct <= 2**bits, f"{distinct} distinct outputs, more than 2^{bits}"
        spacing = quantizer.current_step()
        distance = (output.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
        tolerance = 1e-5 * max(spacing, float(levels.abs().max()))
        worst = int(distance.argmax())
        assert float(distance[worst]) <= tolerance, (
            f"output {float(output[worst]):.6g} (input {float(values[worst]):.6g}) is not on levels() "
            f"(nearest is {float(distance[worst]):.3g} away)"
        )

    return body


def _check_idempotent(build: Factory, bits: int, signed: bool, role: str) -> Callable[[Any], None]:
    if not getattr(build(bits, signed, role), "idempotent", True):
        raise NotApplicable("declared idempotent=False")

    def body(data: Any) -> None:
        quantizer = build(bits, signed, role)
        step = data.draw(_steps(), label="step")
        quantizer.set_step(step)
        values = (_codes(data.draw, quantizer, data.draw(st.integers(1, 64), label="n")) * step).float()
        with torch.no_grad():
            once = quantizer(values)
            twice = quantizer(once)
        tolerance = 1e-5 * max(quantizer.current_step(), float(once.abs().max()))
        error = float((twice - once).abs().max())
        assert error <= tolerance, f"q(q(v)) differs from q(v) by {error:.3g}"

    return body


def _check_shape_dtype(build: Factory, bits: int, signed: bool, role: str) -> Callable[[], None]:
    def body() -> None:
        generator = torch.Generator().manual_seed(0)
        for shape in [(), (7,), (3, 5), (2, 3, 4, 5)]:
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                quantizer = build(bits, signed, role)
                values = torch.randn(shape, generator=generator).to(dtype)
                output = quantizer(values)
                assert output.shape == values.shape, f"shape {tuple(values.shape)} became {tuple(output.shape)}"
                assert output.dtype == dtype, f"dtype {dtype} became {output.dtype}"

    return body


def _check_state_dict(build: Factory, bits: int, signed: bool, role: str) -> Callable[[], None]:
    def body() -> None:
        generator = torch.Generator().manual_seed(1)
        original = build(bits, signed, role)
        with torch.no_grad():
            original(torch.randn(256, generator=generator))
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        buffer.seek(0)
        reloaded = build(bits, signed, role)
        saved = torch.load(buffer, weights_only=True)
        reloaded.load_state_dict(saved)
        assert bool(reloaded.initialized), "the reloaded quantizer is not marked initialized"
        # Different statistics: a quantizer that re-initialized on this batch would give a different output.
        other = 5.0 * torch.randn(256, generator=generator) + 1.0
        with torch.no_grad():
            expected, actual = original(other), reloaded(other)
        assert torch.equal(expected, actual), "outputs differ after a state_dict round trip"
        for key, value in reloaded.state_dict().items():
            assert torch.equal(value, saved[key]), f"'{key}' changed on the first forward after loading (re-initialized?)"

    return body


def _check_init(build: Factory, bits: int, signed: bool, role: str) -> Callable[[], None]:
    def body() -> None:
        generator = torch.Generator().manual_seed(2)
        quantizer = build(bits, signed, role)
        assert not bool(quantizer.initialized), "a new quantizer claims to be initialized"
        first = torch.randn(512, generator=generator)
        with torch.no_grad():
            quantizer(first)
        assert bool(quantizer.initialized), "the first forward did not set the 'initialized' buffer"
        state = {key: value.clone() for key, value in quantizer.state_dict().items()}
        with torch.no_grad():
            quantizer(10.0 * torch.randn(512, generator=generator))
        for key, value in quantizer.state_dict().items():
            assert torch.equal(value, state[key]), f"'{key}' changed on a second forward (re-initialized?)"
        explicit = build(bits, signed, role)
        explicit.initialize(first)
        explicit.mark_initialized()
        with torch.no_grad():
            assert torch.equal(explicit(first), quantizer(first)), "initialize(v) differs from init on first forward"

    return body


def _check_extremes(build: Factory, bits: int, signed: bool, role: str) -> Callable[[], None]:
    def body() -> None:
        generator = torch.Generator().manual_seed(3)
        normal = torch.randn(64, generator=generator)
        huge = torch.where(torch.rand(64, generator=generator) < 0.5, -1e30, 1e30)
        mixed = torch.where(torch.rand(64, generator=generator) < 0.3, huge, normal)
        cases: list[tuple[str, float | None, torch.Tensor]] = [
            ("init on zeros", None, torch.zeros(64)),
            ("init on +-1e30", None, huge),
            ("zeros at step 1", 1.0, torch.zeros(64)),
            ("+-1e30 mixed in at step 1", 1.0, mixed),
            ("normal at step 1e-12", 1e-12, normal),
        ]
        for label, step, values in cases:
            quantizer = build(bits, signed, role)
            if step is not None:
                quantizer.set_step(step)
            values = values.clone().requires_grad_(True)
            output = quantizer(values)
            assert torch.isfinite(output).all(), f"{label}: non-finite output"
            (output * torch.linspace(-1, 1, output.numel()).reshape(output.shape)).sum().backward()
            assert values.grad is not None and torch.isfinite(values.grad).all(), f"{label}: non-finite input gradient"
            for name, parameter in _learnable(quantizer):
                if parameter.grad is not None:
                    assert torch.isfinite(parameter.grad).all(), f"{label}: non-finite gradient for '{name}'"
            for name, value in quantizer.state_dict().items():
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), f"{label}: non-finite state '{name}' after init"

    return body


NOISE_SEED = 20181001  # the seed every forward of a stochastic quantizer's gradient check starts from


@contextlib.contextmanager
def _frozen_noise(quantizer: Quantizer):
    """For a quantizer declaring ``stochastic`` (NICE's noise): torch's RNG seeded the same before each forward, so
    every forward of the check draws the same noise; the global RNG is left as it was. Otherwise nothing."""
    if not getattr(quantizer, "stochastic", False):
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(NOISE_SEED)
        yield


def _check_gradients(build: Factory, bits: int, signed: bool, role: str) -> Callable[[Any], None]:
    def body(data: Any) -> None:
        quantizer = copy.deepcopy(build(bits, signed, role)).double()
        step = data.draw(_steps(), label="step")
        quantizer.set_step(step)
        count = data.draw(st.integers(1, 24), label="n")
        codes = _codes(data.draw, quantizer, count)
        values = codes * step
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        weights = torch.randn(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        learnable = _learnable(quantizer)

        def loss(v: torch.Tensor) -> torch.Tensor:
            with _frozen_noise(quantizer):
                return (quantizer(v) * weights).sum()

        # autograd, through the quantizer's real backward
        leaf = values.clone().requires_grad_(True)
        autograd = torch.autograd.grad(loss(leaf), [leaf] + [p for _, p in learnable], allow_unused=True)
        autograd = [torch.zeros_like(t) if g is None else g for g, t in zip(autograd, [leaf] + [p for _, p in learnable])]

        # the surrogate: straight-through pieces frozen at this point (and, for a gradient that depends on the
        # upstream gradient, filled in by one backward pass of the same loss)
        with _frozen_noise(quantizer):
            recorded, tape = _record_surrogate(quantizer, values, weights, [p for _, p in learnable])
        with torch.no_grad(), _frozen_noise(quantizer):
            plain = quantizer(values)
        assert torch.allclose(recorded, plain, rtol=1e-12, atol=1e-12 * step), (
            "the surrogate forward differs from the forward: build straight-through pieces from "
            "quantizers.round_ste / stop_gradient / scale_grad"
        )

        def surrogate(v: torch.Tensor) -> float:
            with torch.no_grad(), replay_surrogate(tape):
                return float(loss(v))

        def compare(what: str, auto: float, plus: float, minus: float, h: float, where: str) -> None:
            numeric = (plus - minus) / (2 * h)
            tolerance = 1e-6 * (1.0 + abs(numeric)) + 1e-9 * abs(plus) / h
            if abs(auto - numeric) > tolerance:
                centre = surrogate(values)
                left, right = (centre - minus) / h, (plus - centre) / h
                shape = "a jump (raw torch.round?)" if abs(left - right) > 1e3 * (1 + abs(auto)) else "a kink"
                raise AssertionError(
                    f"d loss/d {what} at {where}: autograd {auto:.9g} vs finite difference {numeric:.9g} "
                    f"(one-sided {left:.6g} / {right:.6g}: {shape} nearby); straight-through pieces must use "
                    "quantizers.round_ste / stop_gradient / scale_grad"
                )

        for index in range(count):
            h = 1e-6 * max(abs(float(values[index])), step)
            shift = torch.zeros_like(values)
            shift[index] = h
            compare(
                f"v[{index}]", float(autograd[0][index]), surrogate(values + shift), surrogate(values - shift), h,
                f"v/step={float(codes[index]):.4f}, step={step:.4g}",
            )
        for (name, parameter), auto in zip(learnable, autograd[1:]):
            flat = parameter.data.view(-1)
            for index in range(flat.numel()):
                original = float(flat[index])
                h = 1e-6 * max(abs(original), 1e-3)
                flat[index] = original + h
                plus = surrogate(values)
                flat[index] = original - h
                minus = surrogate(values)
                flat[index] = original
                compare(name, float(auto.reshape(-1)[index]), plus, minus, h, f"{name}={original:.6g}, step={step:.4g}")

    return body


def _record_surrogate(quantizer: Quantizer, values: torch.Tensor, weights: torch.Tensor,
                      parameters: list[torch.nn.Parameter]) -> tuple[torch.Tensor, SurrogateTape]:
    """The forward at ``values`` under a fresh surrogate tape, and the tape. For a quantizer declaring
    ``upstream_dependent_gradient``, recorded with autograd on and back-propagated once through the loss
    ``sum(output * weights)``, so that pieces depending on the upstream gradient are filled in."""
    if not getattr(quantizer, "upstream_dependent_gradient", False):
        with torch.no_grad(), record_surrogate() as tape:
            return quantizer(values), tape
    leaf = values.clone().requires_grad_(True)
    with record_surrogate() as tape:
        output = quantizer(leaf)
        torch.autograd.grad((output * weights).sum(), [leaf] + parameters, allow_unused=True)
    return output.detach(), tape


PROPERTY_CHECKS = {"grid": _check_grid, "idempotent": _check_idempotent, "gradients": _check_gradients}
def _check_options(build: Factory, bits: int, signed: bool, role: str) -> Callable[[], None]:
    def body() -> None:
        original = build(bits, signed, role)
        cls = type(original)
        names = option_names(cls)
        missing = [name for name in names if not hasattr(original, name)]
        assert not missing, (f"option(s) {', '.join(missing)} not stored under their own name: set self.{missing[0]} "
                             "in __init__ (options() reads them back for run metadata and repr)")
        options = original.options()
        name = original.registry_name or cls.__name__
        again = {key: options[key] for key in names}
        if original.role != ("weight" if signed else "activation"):
            again["role"] = original.role
        rebuilt = quantizers.create(name, bits=bits, signed=signed, **again)
        assert rebuilt.options() == options, (f"create('{name}', **options()) gives options {rebuilt.options()} "
                                              f"instead of {options}")

    return body


ONCE_CHECKS = {
    "options": _check_options,
    "shape-dtype": _check_shape_dtype,
    "state-dict": _check_state_dict,
    "init": _check_init,
    "extremes": _check_extremes,
}
