"""The report's statistics: Holm's step-down adjustment, the Holm-level intervals and the resolved column, and
Kendall's tau against a published ranking with its seed bootstrap."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from quantbench.comparison.statistics import holm, paired_differences, ranking_agreement


def test_holm_adjusts_step_down_with_a_running_maximum() -> None:
    # sorted p 0.01, 0.03, 0.04 with m = 3: 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, float("nan")])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])  # NaN is not counted in m


def _results(differences: dict[str, list[float]], bits: int = 2) -> pd.DataFrame:
    rows = []
    seeds = len(next(iter(differences.values())))
    for seed in range(seeds):
        base = 80.0 + seed
        rows.append({"quantizer": "lsq", "variant": "", "bits": bits, "seed": seed, "top1": base})
        for name, values in differences.items():
            rows.append({"quantizer": name, "variant": "", "bits": bits, "seed": seed, "top1": base + values[seed]})
    return pd.DataFrame(rows)


def test_paired_differences_raw_and_holm() -> None:
    values = {"a": [-2.0, -2.2, -1.9, -2.1, -2.05], "b": [0.1, -0.1, 0.2, -0.2, 0.05], "c": [-0.5, -0.4, -0.6, -0.45, -0.5]}
    frame = paired_differences(_results(values)).set_index("label")
    for name, diffs in values.items():
        t = stats.ttest_1samp(diffs, 0.0)
        assert frame.loc[name, "p"] == pytest.approx(t.pvalue, rel=1e-9)
        half = stats.t.ppf(0.975, 4) * pd.Series(diffs).std(ddof=1) / math.sqrt(5)
        assert frame.loc[name, "ci_high"] - frame.loc[name, "difference"] == pytest.approx(half)
    ranked = frame.sort_values("p")
    for rank, (name, row) in enumerate(ranked.iterrows()):  # the i-th smallest p at confidence 1 - 0.05 / (3 - i)
        half = stats.t.ppf(1 - 0.05 / (3 - rank) / 2, 4) * pd.Series(values[name]).std(ddof=1) / math.sqrt(5)
        assert row["ci_high_holm"] - row["difference"] == pytest.approx(half)
    assert frame.loc["a", "resolved"] and frame.loc["c", "resolved"] and not frame.loc["b", "resolved"]
    assert frame["p_holm"].tolist() == pytest.approx(holm(frame["p"].tolist()))


def test_kendall_tau_and_its_bootstrap() -> None:
    published = {"lsq": {2: 67.6}, "qil": {2: 65.7}, "pact": {2: 64.4}, "msqe_reg": {2: 61.7}}
    same_order = _results({"qil": [-1.0, -1.1, -0.9], "pact": [-2.0, -2.1, -1.9], "msqe_reg": [-3.0, -3.2, -2.9]})
    agreement = ranking_agreement(same_order, published, bits=2, resamples=200)
    assert agreement["tau"] == pytest.approx(1.0) and agreement["ci_low"] == pytest.approx(1.0)
    assert agreement["ours"] == ["lsq", "qil", "pact", "msqe_reg"] and agreement["methods"] == 4
    reversed_order = _results({"qil": [1.0, 1.1, 0.9], "pact": [2.0, 2.1, 1.9], "msqe_reg": [3.0, 3.2, 2.9]})
    assert ranking_agreement(reversed_order, published, bits=2, resamples=50)["tau"] == pytest.approx(-1.0)
    assert ranking_agreement(_results({"qil": [0.0, 0.0]}), published, bits=2) is None  # fewer than 3 methods
