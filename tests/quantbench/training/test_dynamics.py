"""Training dynamics (dynamics.csv), oscillation tracking and the oscillation remedies, for every quantizer and a
plugin; the run integration (resume without duplicates), TensorBoard event files and ``quantbench dynamics``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import quantizers
from quantbench.config import TrainConfig
from quantbench.errors import QuantbenchError
from quantbench.qat import QuantConfig, quantize_
from quantbench.training.dynamics import Dynamics
from quantbench.training.oscillation import MOMENTUM, OscillationTracker, dampening_weight, nearest_codes
from quantbench.training.run import train
from quantizers import Quantizer, round_ste
from tests.helpers import assert_one_line

BUILTINS = [name for name in quantizers.available() if quantizers.get(name).__module__.startswith("quantizers.")]


class RangePlugin(Quantizer):
    """A plugin with its own range parameter name (``range_max``): dynamics must not assume LSQ's ``step_size``."""

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.range_max = nn.Parameter(torch.tensor(1.0))

    def _step(self) -> torch.Tensor:
        return self.range_max.abs().clamp_min(1e-8) / self.qp

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        step = self._step()
        return torch.clamp(round_ste(v / step), -self.qn, self.qp) * step

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.range_max.fill_(step * self.qp)

    def levels(self) -> torch.Tensor:
        return torch.arange(-self.qn, self.qp + 1, dtype=torch.float32) * self._step().detach()


@pytest.fixture(scope="module")
def plugin() -> str:
    if "dynamics_range_plugin" not in quantizers.available():
        quantizers.register("dynamics_range_plugin")(RangePlugin)
    return "dynamics_range_plugin"


def small_model(name: str, bits: int = 2) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    quantize_(model, QuantConfig(name, bits=bits), images)
    model(images)  # initialize every quantizer
    return model, images, labels


def run_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, dynamics: Dynamics, steps: int,
              lr: float = 0.05) -> torch.optim.Optimizer:
    """A plain SGD loop calling the callback as the training loop does (after backward, before the step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    dynamics.optimizer = optimizer
    dynamics.tracker.attach(optimizer)
    for step in range(steps):
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels) + dynamics.extra_loss(step)
        optimizer.zero_grad()
        loss.backward()
        dynamics.on_step(step, loss, logits, labels)
        optimizer.step()
    return optimizer


def recorder(model: nn.Module, tmp_path: Path, every: int = 1, steps: int = 6, **remedies: float) -> Dynamics:
    tracker = OscillationTracker(model, total_steps=steps, **remedies)
    return Dynamics(model, tmp_path, every, steps_per_epoch=3, total_steps=steps, tracker=tracker)


@pytest.mark.parametrize("name", [*BUILTINS, "plugin"])
def test_every_quantizer_records_its_range_parameters_clipping_and_oscillation(name: str, plugin: str,
                                                                               tmp_path: Path) -> None:
    name = plugin if name == "plugin" else name
    model, images, labels = small_model(name)
    dynamics = recorder(model, tmp_path)
    run_steps(model, images, labels, dynamics, 6)
    dynamics.flush()
    frame = pd.read_csv(tmp_path / "dynamics.csv")
    assert list(frame.columns) == ["step", "epoch", "layer", "role", "quantity", "value"]
    assert sorted(frame["step"].unique()) == list(range(6)) and not frame.duplicated(
        ["step", "layer", "role", "quantity"]).any()
    assert set(frame["epoch"]) == {0, 1}
    middle = frame[frame["layer"] == "2"]  # the 2-bit layer
    weight_q = model.get_submodule("2").weight_quantizer
    quantities = set(middle[middle["role"] == "weight"]["quantity"])
    assert set(weight_q.range_parameters()) | {"grid_step", "oscillation_frequency", "oscillating_fraction",
                                                "flip_fraction"} <= quantities
    # clipping is in the input's units only for idempotent quantizers (DoReFa's tanh warp is not)
    assert ("clip_fraction" in quantities) == weight_q.idempotent
    clip = frame[frame["quantity"] == "clip_fraction"]["value"]
    assert clip.between(0, 1).all() and frame["value"].map(math.isfinite).all()
    activation = set(middle[middle["role"] == "activation"]["quantity"])
    assert "clip_fraction" in activation or not model.get_submodule("2").input_quantizer.idempotent
    assert {"loss", "batch_top1", "lr"} <= set(frame[frame["layer"] == "-"]["quantity"])


def test_activation_clip_fraction_counts_inputs_outside_the_levels(tmp_path: Path) -> None:
    model, images, labels = small_model("fixed")
    quantizer = model.get_submodule("2").input_quantizer
    quantizer.set_step(1e-3)  # a tiny range: almost every positive input is clipped
    dynamics = recorder(model, tmp_path)
    run_steps(model, images, labels, dynamics, 1, lr=0.0)
    dynamics.flush()
    frame = pd.read_csv(tmp_path / "dynamics.csv")
    row = frame[(frame["layer"] == "2") & (frame["role"] == "activation") & (frame["quantity"] == "clip_fraction")]
    with torch.no_grad():
        inputs = model[1](model[0](images))
    expected = float((inputs > quantizer.levels()[-1]).float().mean())
    assert row["value"].iloc[0] == pytest.approx(expected) and expected > 0.3


def test_oscillation_counts_flips_that_reverse_direction_only() -> None:
    model, _, _ = small_model("fixed")
    tracker = OscillationTracker(model)
    weight = model.get_submodule("2").weight
    quantizer = model.get_submodule("2").weight_quantizer
    levels = quantizer.levels()
    low, high = float(levels[1]), float(levels[2])  # two neighbouring grid points
    with torch.no_grad():
        weight.fill_(low)
        weight[0].fill_(high)  # the first output channel moves up then down (oscillates) ...
    tracker.update(0)
    with torch.no_grad():
        weight[0].fill_(low)
        weight[1].fill_(high)  # ... the second moves up once (a flip, not an oscillation)
    tracker.update(1)
    with torch.no_grad():
        weight[0].fill_(high)
    tracker.update(2)
    index = [name for name, _, _ in tracker.layers].index("2")
    frequency = tracker.state[index]["frequency"].view(weight.shape)  # 576 weights: no sampling
    assert torch.allclose(frequency[0], torch.full_like(frequency[0], MOMENTUM))  # down (step 1) then up (step 2): one oscillation
    assert torch.all(frequency[1:] == 0)
    summary = tracker.summaries(index)
    assert float(summary["flip_fraction"]) == pytest.approx(1 / 8)  # only channel 0 flipped at the last step
    assert torch.equal(nearest_codes(levels, levels), torch.arange(levels.numel()))


@pytest.mark.parametrize("name", ["lsq", "apot"])  # a uniform and a non-uniform grid
def test_the_native_tracking_step_equals_the_tensor_ops(name: str, monkeypatch) -> None:
    """On CPU a step's codes and flat-state update are one native call: the same codes, flags and flips as the tensor
    ops and the same frequencies to float32 rounding, on sampled (5120 weights) and whole layers, 2 and 8 bits, sizes
    that are not multiples of the kernel's 8 lanes."""
    from quantizers.kernels import dispatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 7, 3, padding=1), nn.ReLU(), nn.Conv2d(7, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    images = torch.randn(32, 1, 8, 8)
    quantize_(model, QuantConfig(name, bits=2), images)
    model(images)
    native, tensor_ops = OscillationTracker(model), OscillationTracker(model)
    taken = []
    original = OscillationTracker._native_step
    monkeypatch.setattr(OscillationTracker, "_native_step",
                        lambda self, *args: taken.append(original(self, *args)) or taken[-1])
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        with torch.no_grad():
            for _, weight, quantizer in native.layers:  # about half a grid step: flips both ways, some reversed
                grid = float((quantizer.levels()[1:] - quantizer.levels()[:-1]).min())
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.5 * grid)
        with dispatch.kernels("eager"):
            tensor_ops.update(step)
        before = len(taken)
        with dispatch.kernels("native"):
            native.update(step)
        assert taken[before:] == [step > 0], "the native step did not run (or ran on the first step)"
        for key in ("code", "moved", "rising"):
            assert torch.equal(native._flat[key], tensor_ops._flat[key]), f"step {step}: {key} differs"
        torch.testing.assert_close(native._flat["frequency"], tensor_ops._flat["frequency"], rtol=0, atol=1e-6)
        if step > 0:
            assert torch.equal(native._flipped_flat, tensor_ops._flipped_flat)
    assert bool(native._flat["moved"].any()) and float(native._flat["frequency"].max()) > 0  # something happened
    assert native.sizes == [63, 504, 4096]


def test_tracker_state_survives_a_checkpoint_and_old_state_restarts_tracking(tmp_path: Path) -> None:
    """All layers' state lives in flat tensors (per-layer views); a checkpoint restores it exactly, and state in
    another format (an older checkpoint) starts tracking afresh instead of misreading it."""
    import copy

    model, images, labels = small_model("lsq")
    dynamics = recorder(model, tmp_path, steps=20, freeze=0.02)
    run_steps(model, images, labels, dynamics, 8, lr=0.5)
    saved = dynamics.tracker.state_dict()
    sizes = [v.numel() for state in saved["state"] for k, v in state.items() if k == "code"]
    assert sizes == dynamics.tracker.sizes
    restored = OscillationTracker(copy.deepcopy(model), freeze=0.02, total_steps=20)
    restored.load_state_dict(torch.load(_saved(saved, tmp_path), weights_only=False))
    for original, copied in zip(dynamics.tracker.state, restored.state):
        assert original.keys() == copied.keys()
        for key in original:
            assert torch.equal(original[key], copied[key]), key
    frequency = restored.state[1]["frequency"]
    assert frequency.data_ptr() != restored._flat["frequency"].data_ptr() or restored.sizes[0] == 0
    assert restored._flat["frequency"][restored.sizes[0]:].data_ptr() == frequency.data_ptr()  # a view, not a copy
    old = {"layers": saved["layers"], "state": [{"code": s["code"], "direction": s["code"] * 0,
                                                 "frequency": s["frequency"]} for s in saved["state"]]}
    restored.load_state_dict(old)
    assert all(not state for state in restored.state) and not restored._flat


def _saved(state: dict, tmp_path: Path) -> Path:
    path = tmp_path / "tracker.pt"
    torch.save(state, path)
    assert path.stat().st_size < 1.5 * sum(v.numel() * v.element_size() for s in state["state"] for v in s.values())
    return path


def test_dampening_is_the_papers_term_with_cosine_annealing(plugin: str) -> None:
    assert dampening_weight(0.5, 0, 100) == 0 and dampening_weight(0.5, 100, 100) == pytest.approx(0.5)
    assert dampening_weight(0.5, 50, 100) == pytest.approx(0.25)
    for name in ("lsq", plugin):
        model, _, _ = small_model(name)
        tracker = OscillationTracker(model, dampen=2.0, total_steps=10)
        loss = tracker.dampening_loss(10)
        expected = 0.0
        for _, weight, quantizer in tracker.layers:
            levels = quantizer.levels()
            expected += float(((quantizer(weight) - weight.clamp(levels[0], levels[-1])) ** 2).sum().detach())
        assert float(loss.detach()) == pytest.approx(2.0 * expected, rel=1e-5)
        # its gradient pulls every latent weight towards its grid point
        weight = tracker.layers[1][1]
        before = float((tracker.quantized(10)[1] - weight).abs().sum().detach())
        loss.backward()
        with torch.no_grad():
            weight -= 0.01 * weight.grad
        after = float((tracker.layers[1][2](weight) - weight).abs().sum().detach())
        assert after < before


@pytest.mark.parametrize("name", ["lsq", "dorefa", "plugin"])
def test_freezing_holds_oscillating_weights_at_a_grid_point(name: str, plugin: str, tmp_path: Path) -> None:
    name = plugin if name == "plugin" else name
    model, images, labels = small_model(name)
    dynamics = recorder(model, tmp_path, steps=40, freeze=1e-9)  # any oscillation freezes
    run_steps(model, images, labels, dynamics, 30, lr=0.5)
    index = [layer for layer, _, _ in dynamics.tracker.layers].index("2")
    state = dynamics.tracker.state[index]
    _, weight, quantizer = dynamics.tracker.layers[index]
    frozen = state["frozen"].clone().view(weight.shape)  # (flat state; more weights may freeze later)
    assert frozen.any(), "a large LR oscillates some 2-bit weights"
    with torch.no_grad():
        codes = nearest_codes(quantizer(weight), quantizer.levels())[frozen]
        latent = weight[frozen].clone()
    before = float(quantizer.levels()[-1])
    run_steps(model, images, labels, dynamics, 5, lr=0.5)
    if quantizer.idempotent:  # held on their code's level, which moves with the learned range
        with torch.no_grad():  # optimizer steps (momentum, weight decay) and range updates do not change their codes
            assert torch.equal(nearest_codes(quantizer(weight), quantizer.levels())[frozen], codes)
        assert float(quantizer.levels()[-1]) != before
        assert torch.allclose(weight.detach()[frozen], quantizer.levels()[codes])
    else:  # a warp before the grid (DoReFa's tanh, normalized by the whole tensor): the latent value is held
        assert torch.equal(weight.detach()[frozen], latent)
    dynamics.flush()
    frame = pd.read_csv(tmp_path / "dynamics.csv")
    assert frame[(frame["layer"] == "2") & (frame["quantity"] == "frozen_fraction")]["value"].iloc[-1] > 0
    # 8-bit first/last layers are tracked, never frozen (the paper's max_bits = 4)
    assert "frozen" not in dynamics.tracker.state[0]


def quick(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{"dataset": "digits", "model": "small_cnn", "out": str(out), "epochs": 2,
                          "max_train_batches": 4, "batch_size": 64, **overrides})


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dynamics") / "fp"
    train(quick(out, epochs=1), progress=False)
    return out


def test_a_quantized_run_writes_dynamics_and_a_resumed_run_continues_it_without_duplicates(
        baseline: Path, tmp_path: Path) -> None:
    settings = {"quantizer": "lsq", "bits": 2, "init_from": str(baseline), "epochs": 3, "dynamics_every": 3}
    train(quick(tmp_path / "whole", **settings), progress=False)
    whole = pd.read_csv(tmp_path / "whole" / "dynamics.csv")
    assert sorted(whole["step"].unique()) == [0, 3, 6, 9, 11]  # every 3 steps, and the last step
    config = quick(tmp_path / "resumed", **settings)
    train(config, stop_after_epoch=1, progress=False)
    path = tmp_path / "resumed" / "dynamics.csv"
    # rows written after the checkpoint by a run killed before its next one: the resume drops them
    with open(path, "a") as handle:
        handle.write("6,1,features.4,weight,step_size,123.0\n")
    train(config, resume=True, progress=False)
    resumed = pd.read_csv(path)
    key = ["step", "layer", "role", "quantity"]
    assert not resumed.duplicated(key).any() and 123.0 not in set(resumed["value"])
    pd.testing.assert_frame_equal(resumed.sort_values(key).reset_index(drop=True),
                                  whole.sort_values(key).reset_index(drop=True))
    saved = json.loads((tmp_path / "resumed" / "config.json").read_text())["train"]
    assert saved["dynamics_every"] == 3 and saved["oscillation_freeze"] == 0


def test_remedies_change_training_and_are_recorded(baseline: Path, tmp_path: Path, plugin: str) -> None:
    results = {}
    for name, remedy in (("plain", {}), ("dampen", {"oscillation_dampen": 1e-2}),
                         ("freeze", {"oscillation_freeze": 1e-9})):
        out = tmp_path / name
        train(quick(out, quantizer=plugin, bits=2, init_from=str(baseline), dynamics_every=1, **remedy),
              progress=False)
        results[name] = json.loads((out / "metrics.json").read_text())["test_loss"]
        saved = json.loads((out / "config.json").read_text())["train"]
        assert all(saved[key] == value for key, value in remedy.items())
    assert len(set(results.values())) == 3
    frozen = pd.read_csv(tmp_path / "freeze" / "dynamics.csv")
    assert (frozen[frozen["quantity"] == "frozen_fraction"]["value"] > 0).any()


def test_bad_dynamics_settings_are_one_line_errors() -> None:
    cases = [({"dynamics_every": -1}, "--dynamics-every"), ({"dynamics_every": 2.5}, "--dynamics-every"),
             ({"oscillation_dampen": 0.1}, "--quantizer"), ({"oscillation_freeze": -0.1}, "at least 0"),
             ({"quantizer": "lsq", "bits": 2, "oscillation_freeze": 2.0}, "(0, 1]"),
             ({"quantizer": "lsq", "bits": 2, "oscillation_dampen": float("nan")}, "--oscillation-dampen")]
    for values, fragment in cases:
        with pytest.raises(QuantbenchError) as error:
            TrainConfig(**values)
        assert_one_line(error.value, fragment)


def test_remedies_are_sweepable_and_train_options() -> None:
    from quantbench.comparison.compare import TRAIN_SWEEPS
    from typer.testing import CliRunner

    from quantbench.cli import app

    assert {"oscillation_dampen", "oscillation_freeze"} <= set(TRAIN_SWEEPS)
    text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--dynamics-every", "--oscillation-dampen", "--oscillation-freeze", "--tensorboard"):
        assert flag in text


def test_tensorboard_event_files_hold_loss_accuracy_lr_and_dynamics(baseline: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(quick(out, quantizer="lsq", bits=2, init_from=str(baseline), dynamics_every=2, tensorboard=True),
          progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/batch_top1", "train/lr", "epoch/top1", "epoch/train_loss"} <= tags
    assert "dynamics/step_size/features.4.weight" in tags and "dynamics/clip_fraction/features.4.activation" in tags
    assert [event.step for event in events.Scalars("train/loss")] == [0, 2, 4, 6, 7]
    assert [event.step for event in events.Scalars("epoch/top1")] == [4, 8]
    recorded = pd.read_csv(out / "dynamics.csv")
    loss = recorded[recorded["quantity"] == "loss"]["value"].tolist()
    assert [event.value for event in events.Scalars("train/loss")] == pytest.approx(loss)


def test_dynamics_command_writes_figures_for_several_runs(baseline: Path, tmp_path: Path, cli_error) -> None:
    from quantbench.analyses.dynamics import write_dynamics

    runs = []
    for name in ("lsq", "pact"):
        runs.append(tmp_path / name)
        train(quick(runs[-1], quantizer=name, bits=2, init_from=str(baseline), epochs=1, dynamics_every=1),
              progress=False)
    written = write_dynamics(runs, tmp_path / "fig", command="quantbench dynamics ...")
    assert {path.name for path in written} == {"ranges.png", "clip_fraction.png", "oscillation.png", "summary.md"}
    assert all(path.stat().st_size > 0 for path in written)
    summary = (tmp_path / "fig" / "summary.md").read_text()
    assert "lsq 2-bit" in summary and "pact 2-bit" in summary and "quantbench dynamics ..." in summary
    error = cli_error(["dynamics", str(baseline / "missing"), "--out", str(tmp_path / "x")])
    assert "no dynamics.csv" in error
