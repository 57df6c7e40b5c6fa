"""The conformance kit's checks for the training-time hooks: ``stages`` (the gradient check in each stage a
quantizer names, stochastic noise frozen by seeding) and ``step-hook`` (after_step keeps levels() consistent with
the outputs and updates nothing without a training forward); each catches the broken quantizer it is for."""

from __future__ import annotations

import torch

import quantizers
from quantizers import Quantizer, round_ste
from quantizers.base import Stage
from quantizers.conformance import run_checks


class _FittedStep(Quantizer):
    """A correct quantizer whose step is refitted by after_step from the last training forward (EMA of max|v|)."""

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.register_buffer("step_size", torch.tensor(1.0))
        self._seen: torch.Tensor | None = None

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self._seen = v.detach().abs().max()
        step = self.step_size.to(v.dtype)
        return round_ste(torch.clamp(v / step, -self.qn, self.qp)) * step

    def apply_step(self, step: float) -> None:
        self.step_size.fill_(step)

    def levels(self) -> torch.Tensor:
        return torch.arange(-self.qn, self.qp + 1, dtype=self.step_size.dtype) * self.step_size

    def after_step(self, step: int) -> None:
        if self._seen is not None:
            self.step_size.mul_(0.5).add_(0.5 * self._seen / self.qp)
            self._seen = None


class _StaleLevels(_FittedStep):
    """Broken: levels() reads a grid cached at init, so after the hook moves the step it no longer describes the
    outputs."""

    def apply_step(self, step: float) -> None:
        super().apply_step(step)
        self._cached = self.step_size.clone()

    def levels(self) -> torch.Tensor:
        cached = getattr(self, "_cached", self.step_size)
        return torch.arange(-self.qn, self.qp + 1, dtype=cached.dtype) * cached


class _UpdatesWithoutData(_FittedStep):
    """Broken: every hook call moves the step, with or without a training forward since the last one."""

    def after_step(self, step: int) -> None:
        self.step_size.mul_(1.01)


class _NoisyStage(_FittedStep):
    """Correct: in its 'noisy' stage the forward adds frozen-able noise (a straight-through piece) to the output."""

    stochastic = True

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.stage = Stage(1, 1)

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage

    def conformance_stages(self) -> list[tuple[str, Stage]]:
        return [("noisy", Stage(0, 1))]

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        out = super().quantize(v)
        if self.stage.progress < 1:
            out = out + quantizers.stop_gradient(0.1 * torch.randn_like(out))
        return out


class _UndeclaredNoise(_NoisyStage):
    """Broken: draws noise without declaring ``stochastic``, so every forward of the check draws other noise and
    finite differences measure the noise, not the gradient."""

    stochastic = False


def _checks(name: str, cls: type[Quantizer], checks: tuple[str, ...]) -> dict[str, set[str]]:
    if name not in quantizers.available():
        quantizers.register(name)(cls)
    report = run_checks(name, bits=(2, 4), examples=6, checks=checks)
    return {status: {r.check for r in report.results if r.status == status} for status in ("pass", "fail", "n/a")}


def test_step_hook_passes_a_correct_fitted_quantizer_and_is_na_without_a_hook() -> None:
    assert _checks("kit_fitted_step", _FittedStep, ("step-hook", "stages")) == {
        "pass": {"step-hook"}, "fail": set(), "n/a": {"stages"}}
    assert _checks("lsq", Quantizer, ("step-hook",))["n/a"] == {"step-hook"}


def test_step_hook_catches_levels_that_no_longer_describe_the_outputs() -> None:
    assert "step-hook" in _checks("kit_stale_levels", _StaleLevels, ("step-hook",))["fail"]


def test_step_hook_catches_an_update_without_a_training_forward() -> None:
    report = run_checks(_register("kit_updates_without_data", _UpdatesWithoutData), bits=(2,), checks=("step-hook",))
    assert report.failures() and "without a training forward" in report.failures()[0].detail


def test_stages_check_noise_frozen_by_seeding_and_catch_unfrozen_noise() -> None:
    assert _checks("kit_noisy_stage", _NoisyStage, ("stages",))["pass"] == {"stages"}
    assert "stages" in _checks("kit_undeclared_noise", _UndeclaredNoise, ("stages",))["fail"]


def test_the_table1_methods_pass_the_new_checks() -> None:
    for name, passing in (("lq_nets", {"step-hook"}), ("nice", {"stages"}), ("msqe_reg", {"stages"})):
        report = run_checks(name, bits=(2, 8), examples=5, checks=("stages", "step-hook"))
        assert report.passed, report.table()
        assert {r.check for r in report.results if r.status == "pass"} == passing, name


def _register(name: str, cls: type[Quantizer]) -> str:
    if name not in quantizers.available():
        quantizers.register(name)(cls)
    return name
