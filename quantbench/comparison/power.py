"""``quantbench plan DIR``: how many seeds a question needs, and what they cost, from a finished pilot comparison.

For each (quantizer, bits) against a reference (LSQ by default), the paired differences of top-1 over the seeds both
ran give a mean and a standard deviation ``sd``. From them, with the t distribution (n iterated, since t depends on
n):

* **half-width**: the fewest seeds n for which the 95% paired interval ``t(0.975, n-1) * sd / sqrt(n)`` is at most
  ``--half-width`` points;
* **detect**: the fewest seeds n for which a two-sided paired t-test at level ``alpha`` detects a true difference of
  ``--detect`` points with probability ``--power``: ``P(|T| > t(1-alpha/2, n-1)) >= power``, T noncentral t with n-1
  degrees of freedom and noncentrality ``detect * sqrt(n) / sd`` (the exact power of the paired t-test).

The cost is the measured mean wall time of the pilot's cells times the cells still to train. ``sd`` is itself an
estimate from few seeds: the plan is as good as the pilot, so re-plan once the first added seeds are in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats

from quantbench.comparison.statistics import load, paired_differences
from quantbench.errors import QuantbenchError

MAX_SEEDS = 10_000  # the search gives up here: an sd that large against the target means "not with seeds"


def half_width(sd: float, n: int, confidence: float = 0.95) -> float:
    """Half-width of the paired t interval over n seeds."""
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def seeds_for_half_width(sd: float, target: float, confidence: float = 0.95) -> int | None:
    """The fewest seeds (at least 2) whose interval half-width is at most ``target``; None past MAX_SEEDS."""
    if target <= 0:
        raise QuantbenchError(f"--half-width must be positive, got {target}")
    for n in range(2, MAX_SEEDS + 1):
        if half_width(sd, n, confidence) <= target:
            return n
    return None


def paired_t_power(difference: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Exact power of the two-sided paired t-test at level ``alpha`` over n seeds."""
    if sd == 0:
        return 1.0 if difference != 0 else alpha
    critical = stats.t.ppf(1 - alpha / 2, n - 1)
    noncentrality = abs(difference) * math.sqrt(n) / sd
    distribution = stats.nct(n - 1, noncentrality)
    return float(distribution.sf(critical) + distribution.cdf(-critical))


def seeds_for_power(difference: float, sd: float, power: float = 0.8, alpha: float = 0.05) -> int | None:
    """The fewest seeds (at least 2) that detect ``difference`` with ``power``; None past MAX_SEEDS."""
    if not 0 < power < 1:
        raise QuantbenchError(f"--power must be between 0 and 1, got {power}")
    if difference == 0:
        raise QuantbenchError("--detect must be a non-zero difference in points, e.g. --detect 1.0")
    for n in range(2, MAX_SEEDS + 1):
        if paired_t_power(difference, sd, n, alpha) >= power:
            return n
    return None


@dataclass
class Plan:
    rows: pd.DataFrame  # one per (quantizer, bits): difference, sd, seeds, needed, extra_cells, extra_hours
    seeds: list[int]
    reference: str
    cell_seconds: float  # mean wall time of a quantized cell in the pilot
    baseline_seconds: float  # mean wall time of a full-precision baseline
    needed: int | None  # seeds the whole grid needs (the most any row needs)
    grid_cells_per_seed: int  # quantized cells per seed in the grid (every quantizer x bits)
    extra_hours: float | None  # the whole grid at ``needed`` seeds: the cells and baselines still to train


def plan(directory: str | Path, reference: str = "lsq", half_width_target: float | None = 0.5,
         detect: float | None = None, power: float = 0.8, alpha: float = 0.05) -> Plan:
    """Seeds needed per (quantizer, bits) and the cost of the whole grid at the most any row needs."""
    results, _ = load(directory)
    if half_width_target is None and detect is None:
        raise QuantbenchError("give --half-width POINTS or --detect POINTS (with --power)")
    quantized = results[results["quantizer"] != "fp"]
    ours = quantized[quantized["quantizer"] == reference]
    if ours.empty:
        names = ", ".join(sorted(quantized["quantizer"].unique()))
        raise QuantbenchError(f"{directory} has no runs of the reference '{reference}'; choose one with --reference "
                              f"NAME (quantizers here: {names})")
    seeds = sorted(int(s) for s in quantized["seed"].unique())
    if len(seeds) < 2:
        raise QuantbenchError(f"{directory} has one seed ({seeds[0]}): no spread to estimate; run the pilot with at "
                              "least 2 seeds (3 recommended), e.g. quantbench compare ... --seeds 0,1,2")
    differences = paired_differences(results, reference)  # the report's pairing: same seeds, same bits
    others = differences[(differences["label"] != reference) & ~differences["label"].str.startswith(f"{reference} (")]
    rows = []
    for row in others[others["pairs"] >= 2].sort_values(["label", "bits"]).itertuples():
        sd, count = float(row.sd), int(row.pairs)
        by_width = seeds_for_half_width(sd, half_width_target) if half_width_target is not None else None
        by_power = seeds_for_power(detect, sd, power, alpha) if detect is not None else None
        wanted = [n for n in (by_width, by_power) if n is not None]
        unreachable = (half_width_target is not None and by_width is None) or (detect is not None and by_power is None)
        needed = None if unreachable else max(wanted)
        rows.append({"label": row.label, "bits": int(row.bits), "difference": float(row.difference), "sd": sd,
                     "seeds": count, "half_width_now": half_width(sd, count), "seeds_for_half_width": by_width,
                     "seeds_for_power": by_power, "needed": needed,
                     "extra_cells": None if needed is None else max(0, needed - count)})
    if not rows:
        raise QuantbenchError(f"{directory}: no quantizer shares 2 or more seeds with '{reference}' at any bit width")
    table = pd.DataFrame(rows)
    cell_seconds = float(quantized["wall_time_s"].mean())
    fp = results[results["quantizer"] == "fp"]["wall_time_s"]
    baseline_seconds = float(fp.mean()) if not fp.empty else 0.0
    table["extra_hours"] = [None if cells is None else cells * cell_seconds / 3600 for cells in table["extra_cells"]]
    needed_all = None if table["needed"].isna().any() else int(table["needed"].max())
    cells_per_seed = int(quantized.groupby(["quantizer", "variant", "bits"]).ngroups)
    extra_hours = None
    if needed_all is not None:
        more = max(0, needed_all - len(seeds))
        extra_hours = more * (cells_per_seed * cell_seconds + baseline_seconds) / 3600
    return Plan(table, seeds, reference, cell_seconds, baseline_seconds, needed_all, cells_per_seed, extra_hours)


def _count(value: object) -> str:
    return "unreachable" if value is None or (isinstance(value, float) and math.isnan(value)) else str(int(value))


def plan_markdown(result: Plan, half_width_target: float | None, detect: float | None, power: float) -> str:
    """The plan as a markdown table and a cost line (what ``quantbench plan`` prints and design notes quote)."""
    goals = []
    if half_width_target is not None:
        goals.append(f"seeds for a 95% paired interval of ± {half_width_target:g} points")
    if detect is not None:
        goals.append(f"seeds to detect {detect:g} points with power {power:g} (two-sided paired t-test, 5%)")
    lines = [f"| method | bits | minus {result.reference} | sd of paired differences | seeds now | half-width now "
             "| seeds needed | more cells | more hours |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result.rows.itertuples():
        hours = "" if row.extra_hours is None or pd.isna(row.extra_hours) else f"{row.extra_hours:.2f}"
        extra = "" if row.extra_cells is None or pd.isna(row.extra_cells) else str(int(row.extra_cells))
        lines.append(f"| {row.label} | {row.bits} | {row.difference:+.2f} | {row.sd:.2f} | {row.seeds} | "
                     f"± {row.half_width_now:.2f} | {_count(row.needed)} | {extra} | {hours} |")
    lines += ["", "Seeds needed: " + "; ".join(goals) + " (the larger where both are asked). More cells and hours: for "
              "that row alone (its own cells; the reference needs the same seeds), at the pilot's mean cell time of "
              f"{result.cell_seconds:.0f} s."]
    if result.needed is None:
        lines.append("The whole grid: some row cannot reach the target with seeds (its spread is too large); "
                     "change the target, or the recipe (longer fine-tunes usually shrink the spread).")
    else:
        lines.append(f"The whole grid ({result.grid_cells_per_seed} quantized cells per seed, {result.reference}'s "
                     f"included, and a {result.baseline_seconds:.0f} s baseline per seed) at {result.needed} seeds: "
                     f"{max(0, result.needed - len(result.seeds))} more seeds, about {result.extra_hours:.1f} hours of "
                     "the pilot's cell time (divide by the cells trained at once).")
    return "\n".join(lines)
