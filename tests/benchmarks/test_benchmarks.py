"""``python -m benchmarks.quantizers --quick``: the benchmark runs end to end and writes its tables (structure only,
no timing claims), and its paper-pseudocode contender is LSQ."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import quantizers
from tests.helpers import REPO, run_module



@pytest.mark.slow
def test_quick_benchmark_writes_every_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bench"
    # structure only: skip compiling the kernels in the subprocess
    monkeypatch.setenv("QUANTBENCH_KERNELS", "eager")
    result = run_module("benchmarks.quantizers", "--quick", "--rounds", "2", "--warmup", "0", "--threads", "1",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]

    ops = pd.read_csv(out / "ops.csv")
    # the subprocess sees the built-ins (plugins registered by other tests live only in this process)
    builtins = {"lsq", "fixed", "pact", "qil"}
    expected = {"relu", "clone", "torch.ao fused", "paper pseudocode", "lsq (reference path)", *builtins}
    assert expected <= set(ops.contender)
    assert set(ops.bits) == {2, 8} and set(ops["size"]) == {"2^10", "2^12", "activation"}
    assert (ops.rounds == 2).all() and (ops.median_ms > 0).all()
    assert (ops[ops.contender == "relu"].vs_relu == 1.0).all()

    saved = pd.read_csv(out / "saved.csv")
    lsq = saved[(saved.contender == "lsq") & (saved.role == "activation (unsigned)")].iloc[0]
    assert bool(lsq.input_saved) and lsq.input_sized_saved == 1
    assert set(saved.role) == {"activation (unsigned)", "weight (signed)"}

    train = pd.read_csv(out / "train.csv")
    assert {"fp", *builtins} <= set(train.quantizer) and set(train["mode"]) == {"eager"}
    assert (train[train.quantizer == "fp"].vs_fp_same_mode == 1.0).all()

    machine = json.loads((out / "machine.json").read_text())
    assert {"cpu", "logical_cores", "torch", "torch_threads", "command", "load_average_start"} <= set(machine)
    report = (out / "results.md").read_text()
    for heading in ("## Forward+backward", "## Bytes saved for backward", "## Pre-activation ResNet-20", "## Targets"):
        assert heading in report

    # the side-by-side summary reads the runs' files into the README between its markers, keeping the prose
    readme = tmp_path / "README.md"
    readme.write_text("# prose before\n\n<!-- summary:begin -->\nstale\n<!-- summary:end -->\n\nprose after\n")
    result = run_module("benchmarks.summary", str(out), str(out), "--readme", str(readme), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    text = readme.read_text()
    assert text.startswith("# prose before") and text.rstrip().endswith("prose after") and "stale" not in text
    assert "lsq saves at most one input-sized tensor" in text and "ResNet-20 step, lsq eager <= 1.2x" in text
    fp_row = next(line for line in text.splitlines() if line.startswith("| fp |"))
    assert fp_row.count("(1.000x)") == 2  # eager in each of the two runs; --quick compiles nothing


def test_paper_pseudocode_contender_is_lsq(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is not an installed package
    from benchmarks.quantizers import paper_pseudocode_lsq

    bits = 3
    quantizer = quantizers.create("lsq", bits=bits, signed=False).double()
    quantizer.set_step(0.25)
    v = torch.randn(999, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    upstream = torch.randn(999, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaf = v.clone().requires_grad_(True)
    quantizer(leaf).backward(upstream)
    paper_leaf, paper_step = v.clone().requires_grad_(True), torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    paper = paper_pseudocode_lsq(paper_leaf, paper_step, bits)
    paper.backward(upstream)
    assert torch.equal(paper.detach(), quantizer(v).detach())
    assert torch.allclose(paper_leaf.grad, leaf.grad, rtol=1e-12)
    assert torch.allclose(paper_step.grad, quantizer.step_size.grad, rtol=1e-9)


def test_whole_job_benchmark_times_train_against_the_bare_loop(tmp_path: Path) -> None:
    """Structure only: every contender of both precisions is timed and the ratios are to the bare loop."""
    from benchmarks.whole_job import main

    frame = main(["--dataset", "digits", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)])
    assert set(frame["contender"]) == {f"{label}: {kind}" for label in ("fp", "lsq 2-bit")
                                       for kind in ("bare", "train[memory]", "train[loader]")}
    bare = frame[frame["contender"].str.endswith("bare")]
    assert (bare["ratio_to_bare"] == 1.0).all() and (frame["median_s"] > 0).all()
    assert "python -m benchmarks.whole_job" in (tmp_path / "whole_job.md").read_text()


def test_torch_ao_benchmark_runs_each_contender_the_way_it_is_called(tmp_path: Path) -> None:
    result = run_module("benchmarks.torch_ao", "--sizes", "12", "--rounds", "1", "--threads", "1",
                        "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "torch_ao.csv")
    assert set(frame["contender"]) == {"lsq", "torch.ao module", "torch.ao kernel", "torch.ao kernel, fixed zero point"}
    assert set(frame["setting"]) == {"warm", "default"}
    assert (frame[frame["contender"] == "lsq"]["ratio_to_lsq"] == 1.0).all()


def test_torch_ao_contenders_compute_lsqs_quantizer() -> None:
    """The ratio compares the same maths: torch.ao's module and kernel give LSQ's output (torch.ao multiplies by
    1/scale, LSQ divides: rare elements at a rounding tie may differ by one level)."""
    from benchmarks.torch_ao import contenders

    x = torch.rand(1 << 14, generator=torch.Generator().manual_seed(0)) * 4
    built = contenders(x, 2)
    reference = built["lsq"][0](x).detach()
    for name, (fn, params) in built.items():
        output = fn(x.clone().requires_grad_(True))
        assert (output.detach() == reference).float().mean() > 0.999, name
