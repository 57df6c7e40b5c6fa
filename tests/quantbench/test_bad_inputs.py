"""Issue 26's bad inputs and interrupted writes, each tried as a user would: one ``error: ...`` line and exit status 2
(or a refusal before any training), never a traceback or a silent wrong result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantizers
from quantbench.comparison.compare import build_config

TOML_ERRORS = {
    'lr = "fast"': "option lr (--lr) must be a float",
    'bits = ["two"]': "bits must be whole numbers",
    "bits = [2.5]": "bits must be whole numbers",
    "device = 3": "option device (--device) must be a str",
    'set = "lsq.grad_scale=numel"': "set must be a table",
    'quantizer_options = "grad_scale=numel"': "option quantizer_options (--quantizer-options) must be a table",
    "lr = []": "lr = [] sweeps nothing",
    "seeds = [0, 0]": "--seeds lists 0 more than once",
}


@pytest.mark.parametrize("line", list(TOML_ERRORS))
def test_toml_values_of_the_wrong_type_are_one_line(cli_error, tmp_path: Path, line: str) -> None:
    preset = tmp_path / "preset.toml"
    preset.write_text(f'dataset = "digits"\nquantizers = ["lsq"]\n{line}\n')
    message = cli_error(["compare", "--config", str(preset), "--out", str(tmp_path / "out")])
    assert TOML_ERRORS[line] in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("metrics.json"))


@pytest.mark.parametrize("flags,expected", [
    (["--lr", ""], "--lr needs at least one value"),
    (["--bn", ","], "--bn needs at least one value"),
    (["--schedule", ","], "--schedule needs at least one value"),
    (["--seeds", "0,0"], "--seeds lists 0 more than once"),
    (["--bits", "2,2"], "--bits lists 2 more than once"),
    (["--fp-from", "nosuchdir"], "--fp-from nosuchdir: no full-precision baselines there"),
])
def test_compare_flags_refused_before_training(cli_error, tmp_path: Path, flags, expected) -> None:
    message = cli_error(["compare", "--quantizers", "lsq", "--out", str(tmp_path / "out"), *flags])
    assert expected in message
    assert not Path("nosuchdir").exists()  # a typo in --fp-from creates nothing


def test_freeze_bn_epoch_without_folding_is_refused(cli_error, tmp_path: Path) -> None:
    message = cli_error(["train", "--freeze-bn-epoch", "0", "--out", str(tmp_path / "run")])
    assert "--freeze-bn-epoch only applies with --bn fold" in message


def test_duplicate_seeds_never_reach_the_grid() -> None:
    from quantbench.errors import QuantbenchError

    with pytest.raises(QuantbenchError, match="more than once"):
        build_config({"seeds": [1, 1]})


def _grid_dir(tmp_path: Path) -> Path:
    out = tmp_path / "grid"
    out.mkdir()
    (out / "compare.json").write_text('{"config": {"recipe": {')  # torn
    return out


def test_torn_compare_json_under_report_and_compare(cli_error, tmp_path: Path) -> None:
    out = _grid_dir(tmp_path)
    (out / "results.csv").write_text("run,quantizer,bits,seed,variant,top1\nlsq-2bit-seed0,lsq,2,0,,80.0\n")
    assert "compare.json is empty or not valid JSON" in cli_error(["report", str(out)])
    assert "compare.json is empty or not valid JSON" in cli_error(
        ["compare", "--quantizers", "lsq", "--bits", "2", "--seeds", "0", "--out", str(out)])


def test_a_grid_with_only_baselines_finished_reports_in_one_line(cli_error, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"config": {}}))
    (out / "results.csv").write_text("run,quantizer,bits,seed,variant,top1\nfp-seed0,fp,32,0,,89.0\n")
    assert "no finished quantized cell" in cli_error(["report", str(out)])


def test_status_on_json_that_is_not_a_manifest(cli_error, tmp_path: Path) -> None:
    (tmp_path / "grid.json").write_text('{"cells": [1, 2]}')
    assert "no readable grid.json" in cli_error(["status", str(tmp_path)])


def test_empty_metrics_json_in_a_cell_under_compare(tmp_path: Path) -> None:
    from quantbench.comparison.compare import collect_results, plan
    from quantbench.errors import QuantbenchError

    config = build_config({"quantizers": ["lsq"], "bits": [2], "seeds": [0], "out": str(tmp_path / "grid")})
    cell = next(run for run in plan(config) if run.name == "lsq-2bit-seed0")
    cell.directory.mkdir(parents=True)
    (cell.directory / "metrics.json").write_text("")
    with pytest.raises(QuantbenchError, match=r"metrics.json is empty or not valid JSON \(JSONDecodeError\); delete .* to retrain"):
        collect_results(config)


def test_train_resume_with_empty_metrics_or_config(cli_error, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("")
    (run / "config.json").write_text("")
    assert "config.json is empty or not valid JSON" in cli_error(["train", "--resume", "--out", str(run)])
    (run / "config.json").unlink()
    assert "metrics.json is empty or not valid JSON" in cli_error(["train", "--resume", "--out", str(run)])


@pytest.mark.parametrize("kind", ["dynamics-garbage", "dynamics-torn", "out-is-a-file"])
def test_dynamics_bad_files(cli_error, tmp_path: Path, kind: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = "step,epoch,layer,role,quantity,value\n0,0,-,-,loss,0.5\n50,0,features.0,weight,step,0.1\n"
    out = tmp_path / "out"
    if kind == "dynamics-garbage":
        (run / "dynamics.csv").write_bytes(bytes(range(256)) * 3)
        expected = "is not a dynamics.csv quantbench wrote"
    elif kind == "dynamics-torn":
        (run / "dynamics.csv").write_text(rows + "100,0,features.0,wei")
        expected = "incomplete row"
    else:
        (run / "dynamics.csv").write_text(rows)
        out.write_text("")
        expected = "is a file"
    assert expected in cli_error(["dynamics", str(run), "--out", str(out)])


def test_a_plugin_returning_the_wrong_shape_is_named() -> None:
    class Flattening(type(quantizers.create("lsq", bits=2, signed=True))):
        def quantize(self, v):
            return super().quantize(v).reshape(-1)

    with pytest.raises(quantizers.QuantizerError, match="returned shape .*must keep the shape"):
        Flattening(2, True)(torch.randn(2, 3))


def test_truncated_model_files_under_evaluate_and_export(cli_error, tmp_path: Path) -> None:
    from quantbench.export.integer import read_export
    from quantbench.errors import QuantbenchError

    broken = tmp_path / "model.int.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(QuantbenchError, match="truncated or not a quantbench integer export"):
        read_export(broken)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07 not onnx")
    pytest.importorskip("onnxruntime")
    assert "cannot read" in cli_error(["evaluate", str(onnx_file), "--path", "onnx"])
