"""quantbench compare / report: configuration precedence, grid planning, sweeps, the report, and interruption."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import QUANTBENCH, REPO, subprocess_env
from quantbench.comparison.compare import QUICK_PRESET, build_config, plan, run_compare, variants_for
from quantbench.config import load_config_file
from quantbench.errors import QuantbenchError
from quantbench.comparison.report import reference_label, sweep_markdown, table1_markdown, write_report
from quantbench.comparison.statistics import paired_differences



def test_preset_then_file_then_flags(tmp_path: Path) -> None:
    assert build_config().recipe.dataset == QUICK_PRESET["dataset"] == "digits"
    file = tmp_path / "x.toml"
    file.write_text('dataset = "fashion-mnist"\nepochs = 3\nbits = [2, 4]\n[set]\n"lsq.grad_scale" = ["full", "none"]\n')
    config = build_config(load_config_file(file), {"epochs": 5, "seeds": [7]})
    assert (config.recipe.dataset, config.recipe.epochs, config.bits, config.seeds) == ("fashion-mnist", 5, [2, 4], [7])
    assert config.sweep == {"lsq.grad_scale": ["full", "none"]}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_experiment_configs_are_valid(path: Path) -> None:
    config = build_config(load_config_file(path))
    runs = plan(config)
    cells = sum(len(variants_for(config, name)) for name in config.quantizers) * len(config.bits)
    assert len(runs) == len(config.seeds) * (1 + cells)  # a baseline per seed, then every cell of every sweep


def test_bad_compare_input_is_clear(tmp_path: Path) -> None:
    with pytest.raises(QuantbenchError, match="unknown compare option"):
        build_config({"epoch": 3})
    with pytest.raises(QuantbenchError, match="quantizer 'qil' is not in --quantizers"):
        build_config(None, {"quantizers": ["lsq"], "set": {"qil.output_scale": ["normalized"]}})
    with pytest.raises(QuantbenchError, match="'lsq' has no option 'grad'"):
        build_config(None, {"set": {"lsq.grad": [1]}})
    with pytest.raises(QuantbenchError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")


def test_sweeps_and_progressive_qil_plan() -> None:
    config = build_config(None, {
        "quantizers": ["lsq", "qil"], "bits": [2, 8], "seeds": [0],
        "set": {"lsq.grad_scale": ["full", "numel", "none"]}, "lr": [0.01, 0.0001], "qil_progressive": True,
    })
    runs = {run.name: run for run in plan(config)}
    lsq_runs = [name for name in runs if name.startswith("lsq")]
    assert len(lsq_runs) == 2 * 3 * 2  # bits x grad_scale x lr
    assert runs["lsq-2bit-seed0-grad_scale=numel,lr=0.0001"].config.quantizer_options == {"grad_scale": "numel"}
    assert runs["lsq-2bit-seed0-grad_scale=numel,lr=0.0001"].config.lr == 0.0001
    chain = runs["qil-2bit-seed0-lr=0.01"]
    assert chain.config.init_from.endswith("qil-3bit-seed0-lr=0.01")
    assert runs["qil-5bit-seed0-lr=0.01"].row.get("intermediate") and runs["qil-5bit-seed0-lr=0.01"].config.init_from.endswith("fp/seed0")
    assert runs["qil-8bit-seed0-lr=0.01"].config.init_from.endswith("fp/seed0")


def tiny(out: Path, **flags) -> dict:
    return {"quantizers": ["lsq", "fixed"], "bits": [2, 4], "seeds": [0, 1], "epochs": 1, "fp_epochs": 2,
            "out": str(out), **flags}


def test_compare_runs_the_grid_and_writes_the_report(tmp_path: Path) -> None:
    config = build_config(None, tiny(tmp_path / "cmp", max_train_batches=4))
    results = run_compare(config, command="quantbench compare (test)", progress=False)
    assert len(results) == 2 + 2 * 2 * 2 and results["run"].is_unique
    assert set(results["quantizer"]) == {"fp", "lsq", "fixed"}
    fp = results[results["quantizer"] == "fp"]
    assert set(fp["bits"]) == {32} and (fp["model_size_bits"] > results[results["bits"] == 2]["model_size_bits"].max()).all()
    report = write_report(tmp_path / "cmp").read_text()
    assert "| lsq |" in report and "| full precision |" in report and "**" in report
    assert "dataset digits (paper: ImageNet)" in report and "quantbench compare (test)" in report
    assert (tmp_path / "cmp" / "accuracy_vs_bits.png").stat().st_size > 0
    assert "quantbench report" in report.split("## Training dynamics", 1)[1]  # drawn on request only
    linked = write_report(tmp_path / "cmp", dynamics=True).read_text().split("## Training dynamics", 1)[1]
    for bits in sorted(set(results["bits"]) - {32}):
        folder = tmp_path / "cmp" / "dynamics" / f"{bits}bit"
        assert f"dynamics/{bits}bit/ranges.png" in linked and (folder / "ranges.png").stat().st_size > 0
        summary = (folder / "summary.md").read_text()
        assert "lsq" in summary and "fixed" in summary  # every quantizer of that precision side by side
    assert (tmp_path / "cmp" / "accuracy_vs_model_size.png").stat().st_size > 0
    # same seed and data order: paired differences exist for every (fixed, bits)
    differences = paired_differences(results)
    assert set(differences["bits"]) == {2, 4} and (differences["pairs"] == 2).all()
    # a second call trains nothing and changes nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("metrics.json")}
    again = run_compare(config, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("metrics.json")} == before
    assert again.equals(results)
    # an ablation reusing these baselines trains no new full-precision model
    ablation = build_config(None, tiny(tmp_path / "ablation", max_train_batches=4, quantizers=["lsq"], bits=[2],
                                       seeds=[0], fp_from=str(tmp_path / "cmp"), set={"lsq.grad_scale": ["none"]}))
    rows = run_compare(ablation, progress=False)
    assert not (tmp_path / "ablation" / "fp").exists()
    assert list(rows["run"]) == ["fp-seed0", "lsq-2bit-seed0-grad_scale=none"]
    assert (rows["num_classes"] == 10).all()  # digits: the report's chance level
    assert rows.iloc[0]["top1"] == results.set_index("run").loc["fp-seed0", "top1"]
    # the report can be written elsewhere, standing alone
    standalone = write_report(tmp_path / "cmp", tmp_path / "published")
    assert standalone.parent == tmp_path / "published" and (tmp_path / "published" / "results.csv").is_file()


def test_table1_bolds_the_best_per_column() -> None:
    results = pd.DataFrame([
        {"quantizer": "lsq", "variant": "", "bits": 2, "seed": 0, "top1": 90.0},
        {"quantizer": "lsq", "variant": "", "bits": 2, "seed": 1, "top1": 92.0},
        {"quantizer": "qil", "variant": "", "bits": 2, "seed": 0, "top1": 80.0},
        {"quantizer": "qil", "variant": "", "bits": 2, "seed": 1, "top1": 82.0},
        {"quantizer": "fp", "variant": "", "bits": 32, "seed": 0, "top1": 95.0},
    ])
    table = table1_markdown(results)
    assert "| lsq | **91.00 ± 1.41** |" in table and "| qil | 81.00 ± 1.41 |" in table
    assert "| full precision |  | 95.00 |" in table
    differences = paired_differences(results)
    row = differences.iloc[0]
    assert row["difference"] == -10.0 and row["ci_low"] == row["ci_high"] == -10.0  # identical paired gaps: zero width


def test_sweep_table_has_one_row_per_combination_and_flags_divergence() -> None:
    def run(scale: str, lr: float, seed: int, top1: float, loss: float = 0.3) -> dict:
        return {"quantizer": "lsq", "variant": f"grad_scale={scale} lr={lr}", "bits": 2, "seed": seed, "top1": top1,
                "test_loss": loss, "num_classes": 10, "lsq.grad_scale": scale, "lr": lr}

    results = pd.DataFrame([
        run("full", 0.01, 0, 88.0), run("full", 0.01, 1, 90.0),
        run("none", 0.01, 0, 10.0, 2.3026), run("none", 0.01, 1, 60.0),
        run("none", 0.0001, 0, 85.0), run("none", 0.0001, 1, 86.0, float("nan")),
        {"quantizer": "fp", "variant": "", "bits": 32, "seed": 0, "top1": 91.0, "test_loss": 0.2, "num_classes": 10},
    ])
    table = sweep_markdown(results, {"lsq.grad_scale": ["full", "none"], "lr": [0.01, 0.0001]})
    assert "| quantizer | lsq.grad_scale | lr | 2-bit |" in table
    assert "| lsq | full | 0.01 | **89.00 ± 1.41** |" in table
    assert "| lsq | none | 0.01 | 35.00 ± 35.36 (did not converge: 1/2) |" in table
    assert "| lsq | none | 0.0001 | 85.50 ± 0.71 (did not converge: 1/2) |" in table  # NaN test loss
    assert reference_label(results) == "lsq (grad_scale=full lr=0.01)"


def _compare_process(out: Path) -> subprocess.Popen:
    args = [*QUANTBENCH, "compare", "--quantizers", "lsq,fixed", "--bits", "2,3,4,8",
            "--seeds", "0", "--epochs", "3", "--fp-epochs", "2", "--out", str(out)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())


def _wait_for_finished_runs(out: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list(out.rglob("metrics.json"))) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"compare ended before it could be interrupted:\n{process.stdout.read()}")
        time.sleep(0.05)
    pytest.fail("compare did not finish its first runs in time")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_compare_completes_on_rerun_without_redoing_runs(tmp_path: Path, how: signal.Signals) -> None:
    out = tmp_path / "cmp"
    process = _compare_process(out)
    _wait_for_finished_runs(out, 2, process)  # the baseline and one quantized run are done
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    process.send_signal(how)
    output, _ = process.communicate(timeout=60)
    if how == signal.SIGINT:
        assert process.returncode == 130 and "re-run the same command to continue" in output, output
    else:
        assert process.returncode == -signal.SIGKILL
    rerun = _compare_process(out)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was redone"
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 1 + 2 * 4 and results["run"].is_unique and results["top1"].notna().all()
    assert json.loads((out / "compare.json").read_text())["runs"] == list(results["run"])
    assert (out / "report.md").is_file()


def test_all_means_every_registered_quantizer(tmp_path: Path) -> None:
    import quantizers

    config = build_config(None, {"quantizers": "all", "out": str(tmp_path)})
    assert config.quantizers == quantizers.available() and len(config.quantizers) >= 11
