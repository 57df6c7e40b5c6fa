"""LSQ section 3.6 (quantbench qerror): the exact all-steps-at-once error curves against brute force, the KL reading,
and the report on a tiny trained digits run."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import quantizers
from quantbench import cli
from quantbench.errors import QuantbenchError
from quantbench.analyses.qerror import RATIOS, analyze, check_grid, code_range, error_curves
from quantbench.analyses.qerror_report import write_report
from quantbench.config import TrainConfig
from quantbench.training.run import train


def brute_force(values: torch.Tensor, step: float, lo: int, hi: int) -> dict[str, float]:
    """The metrics of one step, straight from the definitions (independent of the prefix-sum implementation)."""
    v = values.double().flatten()
    codes = torch.clamp(torch.floor(v / step + 0.5), lo, hi)  # cell edges belong to the upper cell
    v_hat = codes * step
    out = {"mae": float((v_hat - v).abs().mean()), "mse": float(((v_hat - v) ** 2).mean())}
    nz = v != 0
    x, c = v[nz], codes[nz]
    low, high = float(x.min()), float(x.max())
    total = 0.0
    for code in c.unique():
        p = float((c == code).double().mean())
        left = -math.inf if code == lo else (float(code) - 0.5) * step
        right = math.inf if code == hi else (float(code) + 0.5) * step
        width = max(min(right, high) - max(left, low), (high - low) / x.numel())
        total -= p * math.log(p / width)
    out["kl"] = total
    return out


@pytest.mark.parametrize("signed,bits", [(True, 2), (False, 2), (True, 4), (False, 8)])
def test_error_curves_match_brute_force(signed: bool, bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    values = torch.randn(5000, generator=generator, dtype=torch.float64)
    if not signed:
        values = values.relu()  # an atom at zero, as after a ReLU
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    step = 0.37
    ratios = torch.tensor([0.013, 0.4, 0.97, 1.0, 2.3, 17.9], dtype=torch.float64)
    curves = error_curves(values, step, lo, hi, ratios)
    for index, ratio in enumerate(ratios.tolist()):
        expected = brute_force(values, step * ratio, lo, hi)
        for metric in ("mae", "mse", "kl"):
            assert float(curves[metric][index]) == pytest.approx(expected[metric], rel=1e-9, abs=1e-12), (metric, ratio)


def test_mse_optimum_matches_the_spec_reference() -> None:
    # quantizers-spec section 4.3: MSE-optimal 2-bit step is 1.049 for N(0,1) signed, 0.651 for ReLU(N(0,1))
    values = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for data, lo, hi, expected in ((values, -2, 1, 1.049), (values.relu(), 0, 3, 0.651)):
        curves = error_curves(data, 1.0, lo, hi, RATIOS)
        best = float(curves["step"][curves["mse"].argmin()])
        assert best == pytest.approx(expected, abs=0.015)


def test_kl_reading_has_an_interior_minimum_and_the_literal_ones_do_not() -> None:
    values = torch.randn(50_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    curves = error_curves(values, 1.0, -2, 1, RATIOS)
    assert 0.2 < float(curves["step"][curves["kl"].argmin()]) < 5
    # H(codes) is minimized by putting everything in one code (largest steps), H + log s by the smallest step
    assert float(curves["step"][curves["kl_literal_pmf"].argmin()]) > 5
    assert float(curves["step"][curves["kl_literal_density"].argmin()]) == pytest.approx(0.01)
    # discrete data (image pixels) has no density
    pixels = torch.randint(0, 17, (5000,), generator=torch.Generator().manual_seed(2)).double()
    assert torch.isnan(error_curves(pixels, 1.0, -128, 127, RATIOS[:10])["kl"]).all()


def test_grid_check_accepts_uniform_quantizers_and_refuses_others() -> None:
    values = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for name in ("lsq", "fixed"):
        quantizer = quantizers.create(name, bits=2, signed=True)
        quantizer(values)  # initialize
        step, lo, hi = code_range(quantizer, quantizer.current_step(), name)
        assert (lo, hi) == (-2, 1)
        check_grid(quantizer, values, step, lo, hi, name)
    dorefa = quantizers.create("pact", bits=2, signed=True)  # DoReFa weights: levels offset by half a step
    dorefa(values)
    with pytest.raises(QuantbenchError, match="not a uniform grid"):
        code_range(dorefa, dorefa.current_step(), "dorefa")
    qil = quantizers.create("qil", bits=2, signed=True)
    qil(values)
    with torch.no_grad():
        qil.gamma.fill_(1.5)
    step, lo, hi = code_range(qil, qil.current_step(), "qil")
    with pytest.raises(QuantbenchError, match="does not quantize as clamp"):
        check_grid(qil, values, step, lo, hi, "qil")


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qerror")
    common = {"dataset": "digits", "model": "small_cnn", "epochs": 1, "threads": 1}
    train(TrainConfig(out=str(root / "fp"), **common), progress=False)
    train(TrainConfig(out=str(root / "lsq2"), quantizer="lsq", bits=2, init_from=str(root / "fp"), **common),
          progress=False)
    return root / "lsq2"


def test_report_on_a_trained_run(lsq_run: Path, tmp_path: Path) -> None:
    result = analyze(lsq_run, batch_size=64)
    summary = result.summary
    assert len(summary) == 4 * 2 * 3  # 4 layers x (weight, activation) x 3 metrics
    assert set(summary["metric"]) == {"mae", "mse", "kl"}
    finite = summary.dropna(subset=["best_ratio"])
    assert ((finite["pct_abs_diff"] - 100 * (finite["best_ratio"] - 1).abs()).abs() < 1e-6).all()
    assert (finite["error_at_best"] <= finite["error_at_learned"] + 1e-12).all()
    assert len(result.curves) == 8 * 2000 and result.curves["ratio"].min() == pytest.approx(0.01)
    # the first layer's input is image pixels: discrete, so no KL; every other tensor has all three
    first_input = summary[(summary["layer"] == "features.0") & (summary["kind"] == "activation")]
    assert first_input.set_index("metric").loc["kl", "best_ratio"] != first_input.set_index("metric").loc["kl", "best_ratio"]
    assert summary.drop(first_input.index)["best_ratio"].notna().all()
    averages = result.averages
    body = averages[averages["layers"] == "2-bit layers"]
    assert set(body["n_layers"]) == {2}  # the two 2-bit layers of small_cnn
    written = write_report(result, tmp_path / "report", "quantbench qerror RUN")
    assert all(path.exists() for path in written)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "quantbench qerror RUN" in text and "| 2-bit layers | weight |" in text
    assert len(pd.read_csv(tmp_path / "report" / "qerror.csv")) == len(summary)


def test_cli_qerror(lsq_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["qerror", str(lsq_run), "--out", str(tmp_path / "q"), "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q" / "qerror.png").exists() and "LSQ paper" in result.output
    fp = lsq_run.parent / "fp"
    with pytest.raises(QuantbenchError, match="full-precision run"):
        analyze(fp)
