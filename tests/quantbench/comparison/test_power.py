"""``quantbench plan``: seeds needed for a half-width and for a power, checked against independent computations (the
t interval's defining inequality, scipy's noncentral t, and the textbook sample sizes of the paired t-test), the cost
arithmetic, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from quantbench.cli import app
from quantbench.comparison import power
from quantbench.errors import QuantbenchError


def _grid(directory: Path, differences: dict[tuple[str, int], list[float]], cell_seconds: float = 100.0,
          baseline_seconds: float = 200.0) -> Path:
    """A finished comparison directory: lsq at 88.0 + a per-seed wobble, others at lsq + the given differences."""
    seeds = len(next(iter(differences.values())))
    rows = [{"run": f"fp-seed{s}", "quantizer": "fp", "bits": 32, "seed": s, "variant": "", "top1": 89.0,
             "wall_time_s": baseline_seconds} for s in range(seeds)]
    bits_used = sorted({bits for _, bits in differences})
    for bits in bits_used:
        for s in range(seeds):
            rows.append({"run": f"lsq-{bits}bit-seed{s}", "quantizer": "lsq", "bits": bits, "seed": s, "variant": "",
                         "top1": 88.0 + 0.3 * math.sin(s + bits), "wall_time_s": cell_seconds})
    for (name, bits), values in differences.items():
        for s, value in enumerate(values):
            base = 88.0 + 0.3 * math.sin(s + bits)
            rows.append({"run": f"{name}-{bits}bit-seed{s}", "quantizer": name, "bits": bits, "seed": s, "variant": "",
                         "top1": base + value, "wall_time_s": cell_seconds})
    directory.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)
    (directory / "compare.json").write_text(json.dumps({"config": {}}))
    return directory


def test_half_width_seeds_are_the_fewest_that_satisfy_the_t_interval() -> None:
    for sd in (0.05, 0.2, 0.37, 1.0, 2.5):
        for target in (0.1, 0.25, 0.5, 1.0):
            n = power.seeds_for_half_width(sd, target)
            assert n is not None and n >= 2
            assert stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= target
            if n > 2:
                assert stats.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) > target


def test_power_seeds_match_the_paired_t_test_tables() -> None:
    """Textbook sample sizes of the one-sample / paired t-test (alpha 0.05 two-sided, power 0.8; G*Power): effect
    size 1.0 -> 10, 0.5 -> 34, 0.8 -> 15."""
    assert power.seeds_for_power(1.0, 1.0, 0.8) == 10
    assert power.seeds_for_power(0.5, 1.0, 0.8) == 34
    assert power.seeds_for_power(0.8, 1.0, 0.8) == 15
    assert power.seeds_for_power(-1.0, 1.0, 0.8) == 10  # the sign does not matter


def test_power_against_scipy_noncentral_t_and_simulation() -> None:
    import numpy as np

    n, difference, sd = 6, 0.7, 0.5
    critical = stats.t.ppf(0.975, n - 1)
    expected = stats.nct(n - 1, difference * math.sqrt(n) / sd).sf(critical)  # the other tail is negligible here
    assert power.paired_t_power(difference, sd, n) == pytest.approx(expected, abs=1e-6)
    rng = np.random.default_rng(0)
    samples = rng.normal(difference, sd, size=(40000, n))
    t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(n))
    assert float((np.abs(t) > critical).mean()) == pytest.approx(power.paired_t_power(difference, sd, n), abs=0.01)


def test_plan_of_a_synthetic_grid(tmp_path: Path) -> None:
    differences = {("fixed", 2): [0.1, -0.3, 0.5], ("pact", 2): [-1.0, -1.2, -0.8], ("pact", 3): [0.0, 0.0, 0.0]}
    directory = _grid(tmp_path / "grid", differences)
    result = power.plan(directory, half_width_target=0.5)
    rows = result.rows.set_index(["label", "bits"])
    sd_fixed = float(pd.Series(differences[("fixed", 2)]).std(ddof=1))
    assert rows.loc[("fixed", 2), "sd"] == pytest.approx(sd_fixed)
    assert rows.loc[("fixed", 2), "difference"] == pytest.approx(0.1)
    assert rows.loc[("fixed", 2), "needed"] == power.seeds_for_half_width(sd_fixed, 0.5)
    assert rows.loc[("pact", 3), "needed"] == 2  # no spread: the minimum
    assert result.cell_seconds == pytest.approx(100.0) and result.baseline_seconds == pytest.approx(200.0)
    assert result.grid_cells_per_seed == 5  # lsq at 2 and 3 bits, fixed 2, pact 2 and 3
    more = result.needed - 3
    assert result.extra_hours == pytest.approx(more * (5 * 100.0 + 200.0) / 3600)
    assert rows.loc[("fixed", 2), "extra_hours"] == pytest.approx(rows.loc[("fixed", 2), "extra_cells"] * 100 / 3600)
    text = power.plan_markdown(result, 0.5, None, 0.8)
    assert "| fixed | 2 | +0.10 |" in text and f"at {result.needed} seeds" in text


def test_plan_command_prints_the_table(tmp_path: Path) -> None:
    directory = _grid(tmp_path / "grid", {("fixed", 2): [0.1, -0.3, 0.5]})
    result = CliRunner().invoke(app, ["plan", str(directory), "--detect", "1.0", "--out", str(tmp_path / "plan.md")])
    assert result.exit_code == 0, result.output
    assert "seeds needed" in result.output and (tmp_path / "plan.md").read_text().startswith("| method |")


def test_plan_errors_are_one_line(tmp_path: Path) -> None:
    one_seed = _grid(tmp_path / "one", {("fixed", 2): [0.1]})
    with pytest.raises(QuantbenchError, match="one seed .*no spread to estimate"):
        power.plan(one_seed)
    two = _grid(tmp_path / "two", {("fixed", 2): [0.1, 0.2]})
    with pytest.raises(QuantbenchError, match="no runs of the reference 'qil'.*--reference"):
        power.plan(two, reference="qil")
    with pytest.raises(QuantbenchError, match="holds no comparison"):
        power.plan(tmp_path / "nothing")
    with pytest.raises(QuantbenchError, match="--power"):
        power.plan(two, detect=1.0, power=1.5)
