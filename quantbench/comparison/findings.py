"""What a comparison finds, as markdown for its report: the paired differences against the reference with raw and
Holm-adjusted intervals, the seeds an unresolved difference would need, Kendall's tau against the LSQ paper's Table 1,
and a few-line summary of all three (which ``report.md`` leads with and the README quotes)."""

from __future__ import annotations

import math

import pandas as pd

from quantbench.comparison.published import PUBLISHED_TOP1, SOURCE
from quantbench.comparison.statistics import ranking_agreement


def paired_markdown(differences: pd.DataFrame, reference: str = "lsq", seeds_needed: dict | None = None) -> str:
    """Raw and Holm-adjusted 95% intervals, a resolved column, and for an unresolved difference the seeds ``quantbench
    plan`` estimates would resolve it (``seeds_needed``: (label, bits) -> n)."""
    if differences.empty:
        return f"(no {reference} runs to pair with)"
    lines = ["| method | bits | top-1 minus reference | sd | 95% interval | p | Holm 95% interval | Holm p | resolved "
             "| seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in differences.itertuples():
        if math.isnan(row.ci_low):
            lines.append(f"| {row.label} | {row.bits} | {row.difference:+.2f} | | n/a (one seed) | | | | | {row.pairs} |")
            continue
        resolved = "yes" if row.resolved else "no"
        if not row.resolved and seeds_needed and seeds_needed.get((row.label, row.bits)):
            resolved += f" (about {seeds_needed[(row.label, row.bits)]} seeds)"
        lines.append(f"| {row.label} | {row.bits} | {row.difference:+.2f} | {row.sd:.2f} | [{row.ci_low:+.2f}, "
                     f"{row.ci_high:+.2f}] | {row.p:.3g} | [{row.ci_low_holm:+.2f}, {row.ci_high_holm:+.2f}] | "
                     f"{row.p_holm:.3g} | {resolved} | {row.pairs} |")
    lines.append("")
    lines.append("Paired by seed (same full-precision baseline, data order and seed); the interval is mean ± "
                 "t(0.975, n-1) · sd / sqrt(n) and p the paired t-test's. Holm: per bit width over its comparisons, "
                 "the comparison ranked i-th by p is tested at 0.05 / (m - i + 1), its interval at that confidence; "
                 "resolved = Holm-adjusted p < 0.05. Unresolved: the seeds a paired t-test at the Holm level would "
                 "need to detect the observed difference with power 0.8, at the observed sd (`quantbench plan`).")
    return "\n".join(lines)


def seeds_to_resolve(differences: pd.DataFrame) -> dict[tuple[str, int], int]:
    """For each unresolved difference: seeds for power 0.8 at its Holm level (Bonferroni over its bit width)."""
    from quantbench.comparison.power import seeds_for_power

    needed: dict[tuple[str, int], int] = {}
    if differences.empty:
        return needed
    for bits, group in differences.groupby("bits"):
        m = int(group["p"].notna().sum())
        for row in group.itertuples():
            if row.resolved or math.isnan(row.sd) or row.difference == 0 or m == 0:
                continue
            n = seeds_for_power(row.difference, row.sd, 0.8, 0.05 / m)
            if n is not None:
                needed[(row.label, int(bits))] = n
    return needed


def ranking_markdown(results: pd.DataFrame) -> str:
    """Kendall's tau between our ranking and the LSQ paper's Table 1 (ImageNet ResNet-18) per bit width."""
    rows = _ranking_rows(results)
    if not rows:
        return ""
    lines = ["| bits | methods | seeds | Kendall's tau | 95% bootstrap interval | ours, best first | paper, best first |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['bits']} | {row['methods']} | {row['seeds']} | {row['tau']:+.2f} | "
                     f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] | {', '.join(row['ours'])} | "
                     f"{', '.join(row['paper'])} |")
    lines += ["", f"Paper: {SOURCE}. Tau over the Table 1 methods present at that bit width (mean top-1 over seeds); "
              "the interval resamples seeds with replacement (the same draw for every method), 2000 times. A tau "
              "near +1: the same order; near 0: unrelated. Different data, model and training length: agreement "
              "says the methods' order transfers, disagreement says it does not at this scale."]
    return "\n".join(lines)


def _ranking_rows(results: pd.DataFrame) -> list[dict]:
    rows = [ranking_agreement(results, {m: values for m, (_, values) in PUBLISHED_TOP1.items()}, int(bits))
            for bits in sorted(results[results["quantizer"] != "fp"]["bits"].unique())]
    return [row for row in rows if row is not None]


def summary_markdown(differences: pd.DataFrame, needed: dict[tuple[str, int], int], results: pd.DataFrame) -> str:
    """Per bit width: which methods are resolved above and below the reference (Holm), how many are not and the most
    seeds one of them would need; then Kendall's tau against the paper."""
    if differences.empty or "resolved" not in differences:
        return ""
    lines = []
    for bits, group in differences.groupby("bits"):
        tested = group[group["p"].notna()]
        below = tested[tested["resolved"] & (tested["difference"] < 0)].sort_values("difference")
        above = tested[tested["resolved"] & (tested["difference"] > 0)].sort_values("difference", ascending=False)
        open_rows = tested[~tested["resolved"]]
        seeds = int(tested["pairs"].max()) if not tested.empty else 0
        text = f"- **{int(bits)} bits** ({len(tested)} comparisons, {seeds} seeds): "
        parts = []
        if not below.empty:
            parts.append("below LSQ, resolved: " + ", ".join(f"{r.label} ({r.difference:+.2f})" for r in below.itertuples()))
        if not above.empty:
            parts.append("above LSQ, resolved: " + ", ".join(f"{r.label} ({r.difference:+.2f})" for r in above.itertuples()))
        if not open_rows.empty:
            estimates = [needed[(r.label, int(bits))] for r in open_rows.itertuples() if (r.label, int(bits)) in needed]
            more = (f" (to detect its observed difference with power 0.8, each would need {min(estimates)} to "
                    f"{max(estimates)} seeds: `quantbench plan`)") if estimates else ""
            parts.append(f"not resolved from LSQ: {len(open_rows)}{more}")
        lines.append(text + "; ".join(parts) + ".")
    for row in _ranking_rows(results):
        lines.append(f"- Ranking against the LSQ paper's Table 1 at {row['bits']} bits ({row['methods']} methods): "
                     f"Kendall's tau {row['tau']:+.2f}, 95% bootstrap interval [{row['ci_low']:+.2f}, "
                     f"{row['ci_high']:+.2f}].")
    lines += ["", "Resolved: the Holm-adjusted 95% interval of the paired difference against LSQ excludes 0 (tables "
              "below)."]
    return "\n".join(lines)
