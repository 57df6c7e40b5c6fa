"""Model quantization and the training harness, on the bundled digits data (no download, seconds per run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import quantizers
from quantbench.errors import QuantbenchError
from quantbench.models import create_model
from quantbench.qat import (
    QuantConfig,
    QuantizedLayer,
    layer_table,
    model_size_bits,
    quantize_,
    quantizer_parameters,
)
from quantbench.config import TrainConfig, paper_lr, paper_weight_decay
from quantbench.training.loop import make_optimizer
from quantbench.training.run import train


def conv_and_linear(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("model_name", ["preact_resnet20", "small_cnn"])
def test_every_conv_and_linear_is_wrapped_first_and_last_at_8_bits(model_name: str) -> None:
    model = create_model(model_name, num_classes=10, in_channels=1)
    names = conv_and_linear(model)
    sample = torch.randn(4, 1, 28, 28)
    quantize_(model, QuantConfig("lsq", bits=2), sample)
    assert conv_and_linear(model) == names
    layers = {name: model.get_submodule(name) for name in names}
    assert all(isinstance(layer, QuantizedLayer) for layer in layers.values())
    first, last = layers[names[0]], layers[names[-1]]
    assert (first.weight_quantizer.bits, first.input_quantizer.bits) == (8, 8)
    assert (last.weight_quantizer.bits, last.input_quantizer.bits) == (8, 8)
    middle = [layers[name] for name in names[1:-1]]
    assert middle and all(layer.weight_quantizer.bits == 2 and layer.input_quantizer.bits == 2 for layer in middle)
    # the image input is signed; every other layer's input follows a ReLU
    assert first.input_quantizer.signed and not any(layer.input_quantizer.signed for layer in middle + [last])
    assert all(layer.weight_quantizer.signed for layer in layers.values())
    assert model(sample).shape == (4, 10)


def test_first_and_last_can_stay_full_precision_and_parameters_are_shared() -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    weights = {name: model.get_submodule(name).weight for name in conv_and_linear(model)}
    quantize_(model, QuantConfig("pact", bits=3, first_last_bits=None), torch.randn(2, 1, 8, 8))
    names = conv_and_linear(model)
    assert not isinstance(model.get_submodule(names[0]), QuantizedLayer)
    assert not isinstance(model.get_submodule(names[-1]), QuantizedLayer)
    assert all(model.get_submodule(name).weight is weights[name] for name in names)  # same Parameter objects


def test_layer_table_and_model_size() -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    total_weights = sum(model.get_submodule(name).weight.numel() for name in conv_and_linear(model))
    fp_bits = model_size_bits(model)
    quantize_(model, QuantConfig("lsq", bits=4, first_last_bits=4), torch.randn(2, 1, 8, 8))
    model(torch.randn(16, 1, 8, 8))
    table = pd.DataFrame(layer_table(model))
    assert list(table["weight_bits"]) == [4] * len(table)
    assert table["weight_step"].notna().all() and table["activation_n"].notna().all()
    saved_bits = total_weights * (32 - 4)
    quantizer_bits = 32 * sum(p.numel() for p in quantizer_parameters(model))
    assert model_size_bits(model) == fp_bits - saved_bits + quantizer_bits


def test_quantizer_parameters_get_their_own_group_without_weight_decay() -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    quantize_(model, QuantConfig("qil", bits=2), torch.randn(2, 1, 8, 8))
    optimizer = make_optimizer(model, TrainConfig(quantizer="qil", bits=2))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["quantizers"]["weight_decay"] == 0.0 and groups["weights"]["weight_decay"] == 0.25e-4
    assert len(groups["quantizers"]["params"]) == len(quantizer_parameters(model)) > 0


def test_paper_defaults() -> None:
    assert [paper_lr(b) for b in (None, 2, 3, 4, 8)] == [0.1, 0.01, 0.01, 0.01, 0.001]
    assert [paper_weight_decay(b) for b in (None, 2, 3, 4, 8)] == [1e-4, 0.25e-4, 0.5e-4, 1e-4, 1e-4]


def quick(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{"dataset": "digits", "model": "small_cnn", "out": str(out), "epochs": 2, **overrides})


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    first = train(quick(tmp_path / "a", seed=3), progress=False)
    second = train(quick(tmp_path / "b", seed=3), progress=False)
    other = train(quick(tmp_path / "c", seed=4), progress=False)
    assert (first["top1"], first["test_loss"]) == (second["top1"], second["test_loss"])
    assert first["test_loss"] != other["test_loss"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    fp = train(quick(tmp_path / "fp"), progress=False)
    assert fp["top1"] > 80
    config = quick(tmp_path / "lsq", quantizer="lsq", bits=2, init_from=str(tmp_path / "fp"), epochs=3)
    whole = train(quick(tmp_path / "whole", quantizer="lsq", bits=2, init_from=str(tmp_path / "fp"), epochs=3),
                  progress=False)
    assert train(config, stop_after_epoch=1, progress=False) == {"interrupted_after_epoch": 1}
    assert not (tmp_path / "lsq" / "metrics.json").exists() and (tmp_path / "lsq" / "checkpoint.pt").exists()
    resumed = train(config, resume=True, progress=False)
    assert resumed["top1"] == whole["top1"] and resumed["test_loss"] == whole["test_loss"]
    assert len(pd.read_csv(tmp_path / "lsq" / "epochs.csv")) == 3
    # a finished run is reused, never redone or overwritten
    assert train(config, resume=True, progress=False) == resumed
    with pytest.raises(QuantbenchError, match="already holds a finished run"):
        train(config, progress=False)


def test_run_directory_holds_config_layers_environment_and_metrics(tmp_path: Path) -> None:
    train(quick(tmp_path / "fp", epochs=1), progress=False)
    out = tmp_path / "q"
    metrics = train(quick(out, quantizer="pact", bits=3, init_from=str(tmp_path / "fp"), epochs=1, distill=True),
                    progress=False)
    assert {"top1", "top5", "wall_time_s", "model_size_bits"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 0.01 and config["train"]["weight_decay"] == 0.5e-4 and config["train"]["distill"]
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers["quantizer"]) == {"pact"} and list(layers["weight_bits"])[1:-1] == [3] * (len(layers) - 2)
    assert "torch" in json.loads((out / "environment.json").read_text())


def test_bad_training_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QuantbenchError, match="give --quantizer and --bits together"):
        train(quick(tmp_path / "x", quantizer="lsq"), progress=False)
    with pytest.raises(QuantbenchError, match="no such checkpoint"):
        train(quick(tmp_path / "y", quantizer="lsq", bits=4, init_from=str(tmp_path / "missing")), progress=False)
    with pytest.raises(quantizers.QuantizerError, match="unknown quantizer"):
        train(quick(tmp_path / "z", quantizer="nope", bits=4), progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "quantbench.cli", "train", "--dataset", "mnist-ish", "--out", str(tmp_path / "w")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unknown dataset 'mnist-ish'" in result.stderr


def test_finished_run_is_never_reused_for_other_settings_and_runs_are_locked(tmp_path: Path) -> None:
    config = quick(tmp_path / "fp", epochs=1)
    train(config, progress=False)
    other = quick(tmp_path / "fp", epochs=1, lr=0.05)
    with pytest.raises(QuantbenchError, match=r"holds a finished run with different settings \(lr\)"):
        train(other, resume=True, progress=False)
    busy = quick(tmp_path / "busy", epochs=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".lock").write_text(str(os.getppid()))  # a live process owns it
    with pytest.raises(QuantbenchError, match="is being trained by process"):
        train(busy, progress=False)
    (tmp_path / "busy" / ".lock").write_text("999999999")  # a dead one: the stale lock is taken over
    assert train(busy, progress=False)["epochs"] == 1
    assert not (tmp_path / "busy" / ".lock").exists()


def test_channels_last_trains_a_quantized_model_to_the_same_result(tmp_path: Path) -> None:
    """--channels-last changes the memory format only: the quantizers' kernels run on NHWC tensors as they are.

    Conv algorithms differ per layout (float noise), which a 2-4 bit model from scratch amplifies into different
    codes, so the comparison is made where it is meaningful: full precision, then a quantized run that must finish."""
    common = dict(epochs=1, max_train_batches=3, device="cpu")
    plain = train(quick(tmp_path / "nchw", **common), progress=False)
    nhwc = train(quick(tmp_path / "nhwc", channels_last=True, **common), progress=False)
    assert abs(plain["test_loss"] - nhwc["test_loss"]) <= 1e-3 * plain["test_loss"]
    quantized = train(quick(tmp_path / "q", channels_last=True, quantizer="lsq", bits=4, **common), progress=False)
    assert math.isfinite(quantized["test_loss"])
    assert json.loads((tmp_path / "q" / "config.json").read_text())["train"]["channels_last"] is True
