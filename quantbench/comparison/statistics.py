"""The statistics of a comparison: paired differences against a reference with raw and Holm-adjusted 95% intervals,
and Kendall's tau between our ranking and a published one, with a bootstrap interval over seeds.

Paired: each seed's cell minus the reference's cell of the same seed and bits (same baseline, data order and seed),
so the seed-to-seed variation both share cancels. Raw: the t interval ``mean ± t(0.975, n-1) sd / sqrt(n)`` and the
paired t-test's p. Holm (1979), per bit width over the m comparisons there: the comparison of rank i (by raw p,
ascending) is tested at level 0.05 / (m - i + 1); its adjusted p is the running maximum of ``(m - i + 1) p`` (capped
at 1), and its adjusted interval is the t interval at confidence ``1 - 0.05 / (m - i + 1)``. "Resolved": adjusted
p < 0.05 (for all but the rare comparison ranked after an unresolved one, the same as its adjusted interval
excluding 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from quantbench.errors import QuantbenchError
from quantbench.utils.io import read_json

ALPHA = 0.05


def load(directory: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    out = Path(directory)
    if not (out / "results.csv").is_file() or not (out / "compare.json").is_file():
        raise QuantbenchError(f"{out} holds no comparison (no results.csv / compare.json); run quantbench compare first")
    try:
        results = pd.read_csv(out / "results.csv", dtype={"variant": str})
    except pd.errors.EmptyDataError:
        results = pd.DataFrame()
    if results.empty:
        raise QuantbenchError(f"{out}/results.csv has no finished runs yet; run (or continue) quantbench compare")
    if "quantizer" not in results or not (results["quantizer"] != "fp").any():
        raise QuantbenchError(f"{out}/results.csv holds no finished quantized cell (full-precision baselines only); "
                              f"`quantbench status {out}` lists the failed cells and their errors")
    results["variant"] = results["variant"].fillna("")
    return results, read_json(out / "compare.json", f"rerun quantbench compare --out {out} to rewrite it")


def row_label(quantizer: str, variant: str) -> str:
    return f"{quantizer} ({variant})" if variant else quantizer




def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given); NaN stays NaN and is not counted."""
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(indexed)
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _interval(mean: float, sd: float, n: int, confidence: float) -> tuple[float, float]:
    if n < 2:
        return float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    return mean - half, mean + half


def paired_differences(results: pd.DataFrame, reference: str = "lsq") -> pd.DataFrame:
    """Per (quantizer, variant, bits) other than the reference: mean and sd of the paired differences, the raw 95%
    interval and p, and the Holm-adjusted ones over the comparisons of the same bit width."""
    quantized = results[results["quantizer"] != "fp"]
    baseline = quantized[quantized["quantizer"] == reference]
    if baseline.empty:
        return pd.DataFrame()
    default_variant = "" if (baseline["variant"] == "").any() else baseline["variant"].iloc[0]
    baseline = baseline[baseline["variant"] == default_variant].set_index(["bits", "seed"])["top1"]
    rows = []
    for (quantizer, variant, bits), group in quantized.groupby(["quantizer", "variant", "bits"], sort=False):
        if quantizer == reference and variant == default_variant:
            continue
        pairs = [row.top1 - baseline[(bits, row.seed)] for row in group.itertuples() if (bits, row.seed) in baseline.index]
        if not pairs:
            continue
        series = pd.Series(pairs, dtype=float)
        n, mean = len(pairs), float(series.mean())
        sd = float(series.std(ddof=1)) if n > 1 else float("nan")
        low, high = _interval(mean, sd, n, 1 - ALPHA)
        if n < 2:
            p = float("nan")
        elif sd == 0:
            p = 0.0 if mean != 0 else 1.0
        else:
            p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
        rows.append({"label": row_label(quantizer, str(variant)), "bits": int(bits), "difference": mean, "sd": sd,
                     "ci_low": low, "ci_high": high, "p": p, "pairs": n})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["p_holm"] = float("nan")
    frame["ci_low_holm"] = float("nan")
    frame["ci_high_holm"] = float("nan")
    for bits, group in frame.groupby("bits"):
        adjusted = holm(group["p"].tolist())
        frame.loc[group.index, "p_holm"] = adjusted
        tested = group[group["p"].notna()].sort_values("p")
        m = len(tested)
        for rank, (index, row) in enumerate(tested.iterrows()):
            low, high = _interval(row["difference"], row["sd"], int(row["pairs"]), 1 - ALPHA / (m - rank))
            frame.loc[index, ["ci_low_holm", "ci_high_holm"]] = [low, high]
    frame["resolved"] = frame["p_holm"] < ALPHA
    return frame


def kendall_tau(ours: dict[str, float], published: dict[str, float]) -> float:
    """Kendall's tau-b between our values and the published ones over the methods both have."""
    methods = sorted(set(ours) & set(published))
    if len(methods) < 3:
        return float("nan")
    return float(stats.kendalltau([ours[m] for m in methods], [published[m] for m in methods]).statistic)


def ranking_agreement(results: pd.DataFrame, published: dict[str, dict[int, float]], bits: int,
                      resamples: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """Kendall's tau between our mean top-1 per method at ``bits`` and ``published`` (method -> {bits: top-1}), with a
    95% percentile bootstrap interval: seeds resampled with replacement, the same draw for every method (they are
    paired by seed). None when fewer than 3 methods have both."""
    quantized = results[(results["quantizer"] != "fp") & (results["variant"] == "") & (results["bits"] == bits)]
    methods = sorted(m for m in quantized["quantizer"].unique() if bits in published.get(m, {}))
    if len(methods) < 3:
        return None
    table = quantized[quantized["quantizer"].isin(methods)].pivot_table(index="seed", columns="quantizer",
                                                                        values="top1").dropna()
    paper = {m: published[m][bits] for m in methods}
    observed = kendall_tau(table.mean().to_dict(), paper)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        sample = table.iloc[rng.integers(0, len(table), len(table))]
        draws.append(kendall_tau(sample.mean().to_dict(), paper))
    draws = [d for d in draws if not math.isnan(d)]
    low, high = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    ours_order = sorted(methods, key=lambda m: -table[m].mean())
    paper_order = sorted(methods, key=lambda m: -paper[m])
    return {"bits": bits, "methods": len(methods), "seeds": len(table), "tau": observed, "ci_low": float(low),
            "ci_high": float(high), "ours": ours_order, "paper": paper_order}
