"""The quantizer contract's training-time hooks as the loop calls them: the Stage signal before each forward and
after_step after each optimizer step, for a plugin defined here and the built-ins that use them; recorded in the
run's config.json; under data parallelism (gloo, 2 CPU processes) state identical on every rank, and LQ-Nets'
update from all-reduced statistics equal to the 1-process update on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import quantizers
from quantbench.config import TrainConfig
from quantbench.training.quantizer_hooks import QuantizerHooks
from quantbench.training.run import train
from tests.quantbench.training.test_distributed import WORLD, _join, _relative_differences, _spawn


class EmaObserverPlugin(quantizers.Quantizer):
    """A user's quantizer: uniform grid whose step is an EMA of max|v|, updated by after_step from the statistics of
    the step's training forward, and which logs every stage and step it is given. Its update uses the rank, so
    without the loop's broadcast two ranks would drift apart."""

    calls: list[tuple[str, int, int, int, int]] = []

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.register_buffer("step_size", torch.tensor(1.0))
        self._observed: torch.Tensor | None = None

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self._observed = v.detach().abs().max()
        return quantizers.round_ste(torch.clamp(v / self.step_size, -self.qn, self.qp)) * self.step_size

    def apply_step(self, step: float) -> None:
        self.step_size.fill_(step)

    def levels(self) -> torch.Tensor:
        return torch.arange(-self.qn, self.qp + 1, dtype=self.step_size.dtype) * self.step_size

    def set_stage(self, stage: quantizers.base.Stage) -> None:
        EmaObserverPlugin.calls.append(("stage", stage.step, stage.total_steps, stage.layer, stage.layers))

    def after_step(self, step: int) -> None:
        EmaObserverPlugin.calls.append(("after", step, 0, 0, 0))
        if self._observed is not None:
            rank = dist.get_rank() if dist.is_initialized() else 0
            self.step_size.mul_(0.9).add_(0.1 * (self._observed + rank) / self.qp)
            self._observed = None


def _register_plugin() -> None:
    if "ema_observer_plugin" not in quantizers.available():
        quantizers.register("ema_observer_plugin")(EmaObserverPlugin)


def test_a_plugin_gets_the_stage_before_each_step_and_after_step_after_it(tmp_path: Path) -> None:
    _register_plugin()
    EmaObserverPlugin.calls.clear()
    out = tmp_path / "plugin"
    train(TrainConfig(quantizer="ema_observer_plugin", bits=4, epochs=2, max_train_batches=3, batch_size=64,
                      device="cpu", out=str(out)), progress=False)
    stages = [call for call in EmaObserverPlugin.calls if call[0] == "stage"]
    afters = [call[1] for call in EmaObserverPlugin.calls if call[0] == "after"]
    quantizers_per_step = len(stages) // 6
    assert len(stages) == 6 * quantizers_per_step and quantizers_per_step >= 2  # weight and input quantizers
    assert sorted({call[1] for call in stages}) == list(range(6)) and {call[2] for call in stages} == {6}
    assert afters == [step for step in range(6) for _ in range(quantizers_per_step)]  # after each optimizer step
    positions = {(call[3], call[4]) for call in stages}
    count = max(call[4] for call in stages)
    assert {layer for layer, _ in positions} == set(range(count)) and {layers for _, layers in positions} == {count}
    order = [call[0] for call in EmaObserverPlugin.calls]
    assert order[:quantizers_per_step] == ["stage"] * quantizers_per_step  # the stage comes before the first forward
    recorded = json.loads((out / "config.json").read_text())["quantizer_hooks"]
    assert recorded["set_stage_quantizers"] == recorded["after_step_quantizers"] == ["ema_observer_plugin"]
    assert "broadcast" in recorded["after_step"]
    state = torch.load(out / "model.pt", weights_only=True)
    assert any(key.endswith("step_size") and float(value) != 1.0 for key, value in state.items())


def test_built_ins_declare_their_hooks_and_hook_free_models_cost_nothing() -> None:
    hooks = {name: quantizers.create(name, bits=4, signed=False).hooks() for name in quantizers.available()
             if quantizers.get(name).__module__.startswith("quantizers.")}
    assert hooks["lq_nets"]["after_step"] and hooks["nice"]["set_stage"] and hooks["msqe_reg"]["set_stage"]
    assert hooks["msqe_reg"]["regularization"] and hooks["pact"]["regularization"]
    assert not any(hooks["lsq"].values()) and not any(hooks["faq"].values())
    assert quantizers.create("nice", bits=4, signed=False).metadata()["hooks"]["set_stage"] is True
    model = nn.Sequential(quantizers.create("lsq", bits=4, signed=False))
    assert not QuantizerHooks(model, steps_per_epoch=5, epochs=1)


def _hooks_worker(rank: int, port: int, out: str, configs: list[dict]) -> None:
    _join(rank, port)
    _register_plugin()
    for config in configs:
        train(TrainConfig(**config), progress=False)
    dist.destroy_process_group()


def test_hooked_state_is_identical_on_every_rank_and_lq_nets_fits_the_global_batch(tmp_path: Path) -> None:
    fp = tmp_path / "fp"
    train(TrainConfig(epochs=1, max_train_batches=4, device="cpu", out=str(fp)), progress=False)
    common = dict(init_from=str(fp), batch_size=128, device="cpu", sync_bn=True, epochs=1)
    runs = {"ema_observer_plugin": dict(quantizer="ema_observer_plugin", bits=4, max_train_batches=3),
            "lq_nets": dict(quantizer="lq_nets", bits=8, max_train_batches=1),
            "nice": dict(quantizer="nice", bits=4, max_train_batches=3),
            "msqe_reg": dict(quantizer="msqe_reg", bits=4, max_train_batches=3)}
    _spawn(_hooks_worker, str(tmp_path), [{**common, **recipe, "out": str(tmp_path / f"{name}-2")}
                                           for name, recipe in runs.items()])
    for name in runs:
        metrics = json.loads((tmp_path / f"{name}-2" / "metrics.json").read_text())
        assert metrics["world_size"] == WORLD and metrics["quantizer_state_identical_across_ranks"] is True, name
    # one step of LQ-Nets on 2 ranks (64 images each, statistics all-reduced) against 1 process on all 128
    train(TrainConfig(**common, **runs["lq_nets"], out=str(tmp_path / "lq_nets-1")), progress=False)
    bases = _relative_differences(tmp_path / "lq_nets-1", tmp_path / "lq_nets-2", "basis")
    assert bases and max(bases.values()) <= 1e-3, bases


def test_the_loop_adds_only_the_terms_of_quantizers_that_define_one() -> None:
    """The loop sums regularization() over the quantizers that override it (the same total as qat.regularization,
    whose other terms are zero) and adds it to the loss: PACT's alpha gets its L2 gradient through the real loop."""
    from quantbench.qat import regularization
    from quantbench.training.loop import Trainer, train_one_epoch

    assert QuantizerHooks(nn.Sequential(quantizers.create("lsq", bits=4, signed=False)), 1, 1).regularization() is None
    pact = quantizers.create("pact", bits=4, signed=False, alpha_l2=10.0)
    model = nn.Sequential(nn.Flatten(), pact, nn.Linear(4, 3), quantizers.create("lsq", bits=4, signed=True))
    batch = (torch.rand(8, 4), torch.randint(0, 3, (8,)))
    model(batch[0])  # initialize
    hooks = QuantizerHooks(model, 1, 1)
    assert torch.equal(hooks.regularization(), regularization(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-30)
    config = TrainConfig(dataset="digits", model="small_cnn", epochs=1, batch_size=8, lr=1e-30)  # nothing moves
    train_one_epoch(Trainer(model, optimizer, config, torch.device("cpu"), 1), [batch], 0)
    alpha_grad = float(pact.alpha.grad)
    (term_grad,) = torch.autograd.grad(pact.regularization(), pact.alpha)
    pact.alpha_l2 = 0.0
    train_one_epoch(Trainer(model, optimizer, config, torch.device("cpu"), 1), [batch], 0)
    assert float(term_grad) != 0.0
    assert alpha_grad - float(pact.alpha.grad) == pytest.approx(float(term_grad), rel=1e-4)
