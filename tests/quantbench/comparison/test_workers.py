"""compare --workers (local worker processes) and --launcher local|slurm (submitit): results, failures, interruption,
the grid manifest, ``quantbench status``, and the Slurm submission (through fake sbatch/sacct: no Slurm here)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import quantizers
from quantbench.cli import app
from quantbench.comparison import grid
from quantbench.comparison.compare import build_config, plan, run_compare
from quantbench.comparison.report import write_report
from quantbench.errors import QuantbenchError
from tests.helpers import QUANTBENCH, subprocess_env

submitit = pytest.importorskip("submitit")

#: the smallest grid that still has a dependency: one baseline, then fine-tunes from it
TINY = {"bits": [2], "seeds": [0], "fp_epochs": 1, "epochs": 1, "max_train_batches": 3, "batch_size": 64, "threads": 1}

BOOM_PLUGIN = '''
import quantizers
from quantizers.fixed import FixedStep


@quantizers.register("boom")
class Boom(FixedStep):
    """A plugin that raises in forward: its cell must fail alone."""

    def quantize(self, v):
        raise RuntimeError("boom: this plugin fails in forward")
'''


@pytest.fixture
def keep_torch_threads():
    """An in-process run with threads=1 sets torch's global thread count: restore it for the tests after this one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worker_grid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``--workers 2`` grid shared by several tests: a baseline, an LSQ cell and a cell whose plugin raises."""
    root = tmp_path_factory.mktemp("workers")
    plugin = root / "boom_plugin.py"
    plugin.write_text(BOOM_PLUGIN)
    quantizers.load_plugins([str(plugin)])
    config = build_config(None, {**TINY, "quantizers": ["lsq", "boom"], "cell_workers": 2, "out": str(root / "w2")})
    results = run_compare(config, command="quantbench compare --workers 2 (test)", progress=False, plugins=[str(plugin)])
    return {"root": root, "config": config, "results": results, "plugin": plugin}


def test_workers_equal_a_sequential_run_with_the_same_per_cell_settings(worker_grid: dict, keep_torch_threads) -> None:
    sequential = build_config(None, {**TINY, "quantizers": ["lsq"], "out": str(worker_grid["root"] / "w1")})
    expected = run_compare(sequential, progress=False).set_index("run")
    parallel = worker_grid["results"].set_index("run")
    assert sorted(parallel.index) == ["fp-seed0", "lsq-2bit-seed0"] and parallel.index.is_unique
    for run in expected.index:  # same seed, data order and threads per cell: the same numbers, not just close ones
        assert parallel.loc[run, ["top1", "top5", "test_loss"]].tolist() == expected.loc[run, ["top1", "top5", "test_loss"]].tolist()
    hashes = {cell["name"]: cell["settings_hash"] for cell in grid.read_manifest(sequential.out)["cells"]}
    for cell in grid.read_manifest(worker_grid["config"].out)["cells"]:
        assert cell["name"] not in hashes or hashes[cell["name"]] == cell["settings_hash"]
    cell_file = json.loads((grid.cells_dir(worker_grid["config"].out) / "lsq-2bit-seed0.json").read_text())["train"]
    assert cell_file["threads"] == 1 and cell_file["init_from"].endswith("fp/seed0")


def test_a_failing_cell_is_reported_failed_and_the_others_finish(worker_grid: dict) -> None:
    out = worker_grid["config"].out
    states = {cell["name"]: (state, detail) for cell, state, detail in grid.grid_states(out)}
    assert states["fp-seed0"][0] == states["lsq-2bit-seed0"][0] == "done"
    assert states["boom-2bit-seed0"] == ("failed", "RuntimeError: boom: this plugin fails in forward")
    assert grid.failed_cells(out) == [("boom-2bit-seed0", "RuntimeError: boom: this plugin fails in forward")]
    report = write_report(out).read_text()
    assert "## Missing cells" in report and "`boom-2bit-seed0`: failed (RuntimeError: boom" in report
    status = CliRunner().invoke(app, ["status", str(out)])
    assert status.exit_code == 0, status.output
    assert "failed boom-2bit-seed0: RuntimeError: boom: this plugin fails in forward" in status.output
    assert "2 done" in status.output and "1 failed" in status.output


def test_bad_launch_input_is_one_line(tmp_path: Path, cli_error, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantbenchError, match="--workers must be an integer of at least 1"):
        build_config(None, {"cell_workers": 0})
    with pytest.raises(QuantbenchError, match="--launcher must be one of workers, local, slurm"):
        build_config(None, {"launcher": "pbs"})
    assert "--slurm-option expects KEY=VALUE" in cli_error(["compare", "--slurm-option", "qos", "--out", str(tmp_path)])
    assert "--slurm-time must be minutes" in cli_error(["compare", "--launcher", "slurm", "--slurm-time", "soon",
                                                        "--out", str(tmp_path)])
    assert "has no readable grid.json" in cli_error(["status", str(tmp_path)])
    from quantbench.comparison import submit

    monkeypatch.setattr(submit, "submitit", None)  # as without the extra installed
    with pytest.raises(QuantbenchError, match=r"needs submitit: pip install quantbench\[slurm\]"):
        run_compare(build_config(None, {**TINY, "quantizers": ["lsq"], "launcher": "local", "out": str(tmp_path / "x")}),
                    progress=False)


def test_launcher_local_runs_a_grid_to_a_report(worker_grid: dict, tmp_path: Path) -> None:
    # The baseline comes from the workers grid (fp_from), so one submitit job trains here: the LSQ cell.
    config = build_config(None, {**TINY, "quantizers": ["lsq"], "launcher": "local", "out": str(tmp_path / "local"),
                                 "fp_from": worker_grid["config"].out})
    results = run_compare(config, progress=False)
    assert list(results["run"]) == ["fp-seed0", "lsq-2bit-seed0"]
    assert results.set_index("run").loc["lsq-2bit-seed0", "top1"] == worker_grid["results"].set_index("run").loc["lsq-2bit-seed0", "top1"]
    manifest = grid.read_manifest(config.out)
    cell = next(cell for cell in manifest["cells"] if cell["name"] == "lsq-2bit-seed0")
    assert manifest["launcher"] == "local" and cell["job_id"] and (tmp_path / "local" / "grid" / "submitit").is_dir()
    assert [state for _, state, _ in grid.grid_states(config.out)] == ["done", "done"]
    assert write_report(config.out).is_file()


# ---- killed mid-grid ----------------------------------------------------------------------------------------------


def _compare(out: Path) -> subprocess.Popen:
    args = [*QUANTBENCH, "compare", "--workers", "2", "--quantizers", "lsq,fixed", "--bits", "2,4", "--seeds", "0",
            "--epochs", "3", "--fp-epochs", "1", "--max-train-batches", "10", "--threads", "1", "--out", str(out)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_stopped_parent_then_rerun_retrains_nothing_finished(tmp_path: Path, how: signal.Signals) -> None:
    out = tmp_path / "grid"
    process = _compare(out)
    deadline = time.time() + 240
    while len(list(out.rglob("metrics.json"))) < 2:  # the baseline and one fine-tune are done, others running
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.1)
    finished = {path: path.stat().st_mtime_ns for path in out.rglob("metrics.json")}
    # the parent only (its own session): SIGINT must stop its workers; SIGKILL takes them along (PR_SET_DEATHSIG)
    process.send_signal(how)
    output, _ = process.communicate(timeout=60)
    if how == signal.SIGINT:
        assert process.returncode == 130 and "re-run the same command to continue" in output, output
    assert len(list(out.rglob("metrics.json"))) < 5, "the grid finished before it was stopped: nothing was tested"
    deadline = time.time() + 30
    while any(grid.lock_owner(path.parent) for path in out.rglob(".lock")) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(grid.lock_owner(path.parent) for path in out.rglob(".lock")), "a cell outlived its killed parent"
    rerun = _compare(out)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was retrained"
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 1 + 2 * 2 and results["run"].is_unique and results["top1"].notna().all()
    assert [state for _, state, _ in grid.grid_states(out)] == ["done"] * 5


# ---- Slurm, up to what would be submitted -------------------------------------------------------------------------


def _fake_slurm(bin_dir: Path) -> Path:
    """``srun``, ``sbatch`` (records each script, answers job 1000, 1001, ...) and ``sacct`` (prints sacct.txt)."""
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": '#!/bin/sh\nd=$(dirname "$0")\nn=$(ls "$d"/submitted-*.sh 2>/dev/null | wc -l)\n'
                  'cp "$1" "$d/submitted-$n.sh"\necho "Submitted batch job $((1000 + n))"\n',
        "sacct": '#!/bin/sh\ncat "$(dirname "$0")/sacct.txt" 2>/dev/null\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    return bin_dir


SLURM = {"partition": "gpu", "time": "4:00:00", "gpus_per_node": 1, "array_parallelism": 8,
         "options": {"qos": "high", "cpus_per_task": "8", "mail-user": "me@example.org", "reservation": "ml"}}


def test_slurm_parameters_and_scripts(tmp_path: Path) -> None:
    from quantbench.comparison.submit import parse_minutes, processes_per_cell, sbatch_script, slurm_parameters

    config = build_config(None, {"launcher": "slurm", "slurm": SLURM, "out": str(tmp_path / "cifar")})
    parameters = slurm_parameters(config)
    assert parameters["partition"] == "gpu" and parameters["time"] == 240 and parameters["gpus_per_node"] == 1
    assert parameters["qos"] == "high" and parameters["cpus_per_task"] == 8 and parameters["array_parallelism"] == 8
    assert parameters["mail_user"] == "me@example.org"  # a key submitit knows becomes its parameter ...
    assert parameters["additional_parameters"] == {"reservation": "ml"}  # ... any other goes to sbatch as it is
    assert (parse_minutes("1-12:00:00"), parse_minutes("90"), parse_minutes("0:30")) == (2160, 90, 30)
    multi_gpu = build_config(None, {"launcher": "slurm", "slurm": {**SLURM, "gpus_per_node": 4}, "out": str(tmp_path)})
    assert processes_per_cell(multi_gpu) == 4  # a 4-GPU cell is a 4-process torchrun job inside its allocation
    assert "torch.distributed.run" in grid.cell_command(tmp_path / "cell.json", processes_per_cell(multi_gpu))
    script = sbatch_script(config, 44, dependency="afterok:1000_0")
    for line in ("#SBATCH --array=0-43%8", "#SBATCH --dependency=afterok:1000_0", "#SBATCH --partition=gpu",
                 "#SBATCH --time=240", "#SBATCH --gpus-per-node=1", "#SBATCH --qos=high", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mail-user=me@example.org", "#SBATCH --reservation=ml", "#SBATCH --signal=USR2@90"):
        assert line in script, (line, script)


def test_slurm_submission_dependencies_and_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantbench.comparison.cell_job import CellJob
    from rich.console import Console

    fake = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    config = build_config(None, {"quantizers": ["lsq", "fixed"], "bits": [2], "seeds": [0, 1], "launcher": "slurm",
                                 "slurm": SLURM, "out": str(tmp_path / "grid")})
    console = Console(record=True, width=200)
    results = run_compare(config, progress=False, console=console)
    assert results.empty  # returns once submitted
    scripts = [(fake / f"submitted-{n}.sh").read_text() for n in range(3)]
    assert not (fake / "submitted-3.sh").exists()
    assert "--array=0-1%2" in scripts[0] and "--dependency" not in scripts[0]  # the two baselines, one array
    assert "--dependency=afterok:1000_0" in scripts[1] and "--dependency=afterok:1000_1" in scripts[2]
    assert "--partition=gpu" in scripts[1] and "submitit.core._submit" in scripts[1]
    manifest = {cell["name"]: cell for cell in grid.read_manifest(config.out)["cells"]}
    assert {name: cell["job_id"] for name, cell in manifest.items()} == {
        "fp-seed0": "1000_0", "fp-seed1": "1000_1", "lsq-2bit-seed0": "1001_0", "fixed-2bit-seed0": "1001_1",
        "lsq-2bit-seed1": "1002_0", "fixed-2bit-seed1": "1002_1"}
    assert [state for _, state, _ in grid.grid_states(config.out)] == ["queued"] * 6
    # each array task is a Checkpointable cell: on preemption/timeout it requeues itself (train --resume continues)
    pickled = sorted((tmp_path / "grid" / "grid" / "slurm").rglob("1001_0_submitted.pkl"))
    job = pickle.loads(pickled[0].read_bytes()).function
    assert isinstance(job, CellJob) and job.name == "lsq-2bit-seed0"
    assert isinstance(job.checkpoint().function, CellJob)

    # a rerun while everything is queued submits nothing
    (fake / "sacct.txt").write_text("JobID|State|NodeList\n1000_[0-1]|PENDING|\n1001_[0-1]|PENDING|\n1002_[0-1]|PENDING|\n")
    run_compare(config, progress=False, console=console)
    assert not (fake / "submitted-3.sh").exists() and "nothing to submit" in console.export_text()
    # one fine-tune failed: only it goes out again, after its (still queued) baseline
    (fake / "sacct.txt").write_text("JobID|State|NodeList\n1000_[0-1]|PENDING|\n1001_[0-1]|PENDING|\n"
                                    "1002_0|PENDING|\n1002_1|FAILED|node1\n")
    status = CliRunner().invoke(app, ["status", config.out])
    assert "job 1002_1 left the" in status.output and "5 queued · 1 failed" in status.output, status.output
    run_compare(config, progress=False, console=console)
    again = (fake / "submitted-3.sh").read_text()
    assert "--dependency=afterok:1000_1" in again and "--array" not in again  # one cell: a plain job
    assert grid.read_manifest(config.out)["cells"][-1]["job_id"] == "1003"
    assert len(plan(config)) == 6
