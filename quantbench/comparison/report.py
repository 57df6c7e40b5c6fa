"""``quantbench report DIR``: a comparison's results as the paper shows them.

Writes ``DIR/report.md`` with a Table-1-style table (rows quantizers, columns bits, top-1 mean +- std over seeds, the
full-precision row, the best per column in bold), paired differences against LSQ with 95% t-intervals over seeds,
figures of accuracy versus bits and versus model size (the paper's Figure 3), the command and config that made it,
and the list of places where the run's recipe departs from the paper's.
"""

from __future__ import annotations

import json
import re
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from quantbench.errors import QuantbenchError  # noqa: E402
from quantbench.utils.io import write_csv, write_text  # noqa: E402
from quantbench.config import paper_lr, paper_weight_decay  # noqa: E402
from quantbench.comparison.published import published_markdown  # noqa: E402
from quantbench.comparison.findings import (paired_markdown, ranking_markdown, seeds_to_resolve,  # noqa: E402,F401
                                            summary_markdown)
from quantbench.comparison.statistics import load, paired_differences, row_label  # noqa: E402,F401

PAPER_MODELS = ("preact_resnet18", "preact_resnet34", "preact_resnet50", "vgg16_bn")


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan"), len(values)


def table1(results: pd.DataFrame) -> pd.DataFrame:
    """Rows quantizer (+ option variant), columns bits: top-1 mean, std and seed count."""
    quantized = results[results["quantizer"] != "fp"]
    rows = []
    for (quantizer, variant, bits), group in quantized.groupby(["quantizer", "variant", "bits"], sort=False):
        mean, std, n = _mean_std(group["top1"])
        rows.append({"label": row_label(quantizer, variant), "bits": int(bits), "mean": mean, "std": std, "n": n})
    return pd.DataFrame(rows, columns=["label", "bits", "mean", "std", "n"])


def _cell(mean: float, std: float, bold: bool) -> str:
    text = f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"
    return f"**{text}**" if bold else text


def table1_markdown(results: pd.DataFrame) -> str:
    summary = table1(results)
    bits = sorted(summary["bits"].unique())
    labels = list(dict.fromkeys(summary["label"]))
    best = summary.loc[summary.groupby("bits")["mean"].idxmax()].set_index("bits")["label"].to_dict()
    fp = results[results["quantizer"] == "fp"]["top1"]
    lines = ["| method | " + " | ".join(f"{b}-bit" for b in bits) + " | full precision |",
             "|---|" + "---|" * (len(bits) + 1)]
    for label in labels:
        cells = []
        for b in bits:
            match = summary[(summary["label"] == label) & (summary["bits"] == b)]
            cells.append("" if match.empty else _cell(match["mean"].iloc[0], match["std"].iloc[0], best.get(b) == label))
        lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    if not fp.empty:
        mean, std, _ = _mean_std(fp)
        lines.append("| full precision | " + " | " * len(bits) + _cell(mean, std, False) + " |")
    seeds = sorted(results["seed"].unique())
    lines.append("")
    lines.append(f"Top-1 test accuracy (%), mean ± standard deviation over seeds {', '.join(map(str, seeds))}; "
                 "the best quantizer per column in bold.")
    return "\n".join(lines)


def did_not_converge(row: Any) -> bool:
    """At chance: top-1 within one point of 100 / num_classes, or no finite test loss (the paper's "did not converge")."""
    if not math.isfinite(float(row["test_loss"])):
        return True
    classes = row.get("num_classes")
    return classes is not None and not pd.isna(classes) and float(row["top1"]) <= 100.0 / float(classes) + 1.0


def sweep_markdown(results: pd.DataFrame, sweep: dict[str, list[Any]]) -> str:
    """One row per combination of swept values (the paper's Table 3 / Table 2 layout), columns bits.

    The first row uses the first value of every swept option, which is the reference in the paired differences.
    """
    keys = [key for key in sweep if key in results.columns]
    quantized = results[results["quantizer"] != "fp"]
    bits = sorted(quantized["bits"].unique())
    summary = table1(quantized)
    best = summary.loc[summary.groupby("bits")["mean"].idxmax()].set_index("bits")["label"].to_dict()
    lines = ["| quantizer | " + " | ".join(keys) + " | " + " | ".join(f"{b}-bit" for b in bits) + " |",
             "|---|" + "---|" * (len(keys) + len(bits))]
    for (quantizer, variant), group in quantized.groupby(["quantizer", "variant"], sort=False):
        label = row_label(quantizer, variant)
        cells = []
        for b in bits:
            runs = group[group["bits"] == b]
            if runs.empty:
                cells.append("")
                continue
            mean, std, n = _mean_std(runs["top1"])
            text = _cell(mean, std, best.get(b) == label)
            failed = sum(did_not_converge(row) for _, row in runs.iterrows())
            if failed:
                text += f" (did not converge: {failed}/{n})"
            cells.append(text)
        values = [str(group[key].iloc[0]) for key in keys]
        lines.append(f"| {quantizer} | " + " | ".join(values) + " | " + " | ".join(cells) + " |")
    seeds = sorted(results["seed"].unique())
    lines.append("")
    lines.append(f"Top-1 test accuracy (%), mean ± standard deviation over seeds {', '.join(map(str, seeds))}; the best "
                 "combination per column in bold. \"did not converge\": top-1 within one point of chance "
                 "(100 / classes) or a non-finite test loss.")
    return "\n".join(lines)


def reference_label(results: pd.DataFrame, reference: str = "lsq") -> str:
    """The row the paired differences subtract: the quantizer without options, or its first swept combination."""
    runs = results[results["quantizer"] == reference]
    if runs.empty or (runs["variant"] == "").any():
        return reference
    return row_label(reference, runs["variant"].iloc[0])


def draw_figures(results: pd.DataFrame, out: Path) -> list[Path]:
    sns.set_theme(style="whitegrid", context="notebook")
    quantized = results[results["quantizer"] != "fp"].copy()
    quantized["method"] = [row_label(q, v) for q, v in zip(quantized["quantizer"], quantized["variant"])]
    quantized["model size (MB)"] = quantized["model_size_bits"] / 8 / 1e6
    fp = results[results["quantizer"] == "fp"]

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=quantized, x="bits", y="top1", hue="method", style="method", markers=True, dashes=False,
                 errorbar="sd", err_style="bars", ax=axis)
    if not fp.empty:
        axis.axhline(fp["top1"].mean(), color="black", linestyle="--", linewidth=1, label="full precision")
    axis.set_xticks(sorted(quantized["bits"].unique()))
    axis.set_xlabel("bits (weights and activations)")
    by_bits = _finish(figure, axis, "accuracy versus precision (mean ± sd over seeds)", out / "accuracy_vs_bits.png")

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    sizes = pd.concat([quantized, fp.assign(method="full precision", **{"model size (MB)": fp["model_size_bits"] / 8 / 1e6})])
    sns.scatterplot(data=sizes, x="model size (MB)", y="top1", hue="method", style="method", s=60, ax=axis)
    axis.set_xscale("log")
    by_size = _finish(figure, axis, "accuracy versus model size (paper's Figure 3)", out / "accuracy_vs_model_size.png")
    return [by_bits, by_size]


def _finish(figure: Any, axis: Any, title: str, path: Path) -> Path:
    axis.set_ylabel("top-1 (%)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def departures(config: dict[str, Any]) -> list[str]:
    """Where this comparison's recipe differs from the LSQ paper's (section 3, spec section 1.5)."""
    recipe = config["recipe"]
    notes = []
    if recipe["dataset"] != "imagenet":
        notes.append(f"dataset {recipe['dataset']} (paper: ImageNet)")
    if recipe["model"] not in PAPER_MODELS:
        notes.append(f"model {recipe['model']} (paper: pre-activation ResNet-18/34/50/152, VGG-16-BN, SqueezeNext)")
    notes.append(f"quantized fine-tuning for {recipe['epochs']} epoch(s) (paper: 90, and 1 at 8 bits); "
                 f"full-precision baseline trained for {config['fp_epochs']} epoch(s) from scratch")
    sweep = config.get("sweep", {})
    if recipe.get("lr") is not None and "lr" not in sweep:
        notes.append(f"learning rate {recipe['lr']} at every precision (paper: {paper_lr(2)} at 2-4 bits, {paper_lr(8)} at 8 bits)")
    if recipe.get("weight_decay") is not None and "weight_decay" not in sweep:
        notes.append(f"weight decay {recipe['weight_decay']} at every precision "
                     f"(paper: {paper_weight_decay(2)} / {paper_weight_decay(3)} / {paper_weight_decay(4)} at 2 / 3 / 4+ bits)")
    for key, values in sweep.items():
        notes.append(f"swept {key} over {values}")
    if recipe["schedule"] != "cosine":
        notes.append(f"{recipe['schedule']} learning-rate decay (paper: cosine without restarts)")
    if recipe["first_last_bits"] != 8:
        first_last = "full precision" if recipe["first_last_bits"] is None else f"{recipe['first_last_bits']} bits"
        notes.append(f"first and last layers at {first_last} (paper: 8 bits)")
    if recipe["momentum"] != 0.9:
        notes.append(f"momentum {recipe['momentum']} (paper: 0.9)")
    if recipe["distill"]:
        notes.append("knowledge distillation on (paper: only in its section 3.7 rows)")
    if recipe.get("max_train_batches"):
        notes.append(f"at most {recipe['max_train_batches']} batches per epoch")
    if recipe["quantizer_options"]:
        notes.append(f"quantizer options {recipe['quantizer_options']}")
    if config.get("qil_progressive"):
        notes.append("QIL fine-tuned progressively (full precision -> 5 -> 4 -> 3 -> 2 bits), as the QIL paper trains")
    notes.append("PACT and QIL use quantbench's recorded conventions (README: Conventions), e.g. QIL's output at the "
                 "input's scale and PACT's alpha initialized at LSQ's operating point")
    table1_methods = sorted(set(config.get("quantizers", [])) & {"faq", "lq_nets", "nice", "msqe_reg"})
    if table1_methods:
        notes.append(f"{', '.join(table1_methods)} run under this one recipe, not their papers' own, and follow the "
                     "readings recorded in README: Conventions (experiments/table1.toml lists each one's departures)")
    return notes


def _history_lines(saved: dict[str, Any]) -> list[str]:
    """The invocations that trained this grid, when there was more than one (interrupted, split across processes)."""
    history = [entry for entry in saved.get("history", []) if entry.get("pending_runs")]
    if len(history) <= 1:
        return []
    return ["", "The runs were trained by these invocations (finished runs are never redone):", "",
            *[f"- `{entry['command']}` ({entry['started']}, {entry['pending_runs']} runs pending)" for entry in history]]


def _missing_lines(source: Path) -> list[str]:
    """Cells of the grid (grid.json) without a result: failed with their error line, or not finished yet."""
    from quantbench.comparison.grid import grid_states

    missing = [(cell["name"], state, detail) for cell, state, detail in grid_states(source)
               if state != "done" and not cell.get("intermediate")]
    if not missing:
        return []
    return ["## Missing cells", "", f"{len(missing)} cell(s) of the grid have no result; the tables above leave them "
            "out (`quantbench status DIR` shows them live).", "",
            *[f"- `{name}`: {state}" + (f" ({detail})" if detail else "") for name, state, detail in missing], ""]


def _published_lines(results: pd.DataFrame) -> list[str]:
    table = published_markdown(results)
    return ["## Beside the published numbers (the LSQ paper's Table 1, ImageNet ResNet-18)", "", table, ""] if table else []


def _sweep_lines(results: pd.DataFrame, config: dict[str, Any]) -> list[str]:
    sweep = config.get("sweep") or {}
    if not sweep:
        return []
    return ["## Option sweep: one row per combination", "", sweep_markdown(results, sweep), ""]


def dynamics_lines(source: Path, results: pd.DataFrame, out: Path) -> list[str]:
    """Side-by-side training dynamics (``quantbench dynamics``) of every quantizer per precision and option variant,
    for the first seed, into ``out/dynamics/<bits>bit[-variant]``; the report's links to them."""
    from quantbench.analyses.dynamics import write_dynamics

    if results.empty or "run" not in results:
        return []
    rows = results[[(source / "runs" / str(run) / "dynamics.csv").is_file() for run in results["run"]]]
    if rows.empty:
        return []
    rows = rows[rows["seed"] == rows["seed"].min()]
    lines = ["## Training dynamics", "",
             f"Every quantizer side by side (seed {int(rows['seed'].min())}): range parameters relative to their "
             "start, clip fractions and weight oscillation (`quantbench dynamics`; README: training dynamics).", ""]
    variants = rows["variant"].fillna("") if "variant" in rows else pd.Series("", index=rows.index)
    for (bits, variant), group in rows.groupby([rows["bits"], variants], sort=True):
        name = f"{int(bits)}bit" + (f"-{_slug(variant)}" if variant else "")
        runs = [source / "runs" / str(run) for run in group["run"]]
        written = write_dynamics(runs, out / "dynamics" / name,
                                 command=f"quantbench dynamics {' '.join(str(r) for r in runs)} --out {out / 'dynamics' / name}")
        title = f"{int(bits)}-bit" + (f", {variant}" if variant else "")
        links = ", ".join(f"[{path.name}](dynamics/{name}/{path.name})" for path in written)
        lines.append(f"- {title}: {links}")
    return [*lines, ""]


def _dynamics_hint(source: Path, results: pd.DataFrame) -> list[str]:
    if results.empty or not any((source / "runs" / str(run) / "dynamics.csv").is_file() for run in results["run"]):
        return []
    return ["## Training dynamics", "", f"The runs recorded their dynamics: `quantbench report {source}` draws every "
            "quantizer's side by side and links them here.", ""]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", str(text).replace(" ", ","))


def write_report(directory: str | Path, out: str | Path | None = None, dynamics: bool = False) -> Path:
    """Write report.md and its figures for the comparison in ``directory`` (into ``out``, default the same
    directory, with copies of results.csv and compare.json so the report stands alone). ``dynamics``: also draw the
    runs' training dynamics side by side and link them (otherwise the report says how)."""
    source = Path(directory)
    results, saved = load(source)
    out = Path(out) if out is not None else source
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != source.resolve():
        for name in ("results.csv", "compare.json"):
            (out / name).write_bytes((source / name).read_bytes())
    config = saved["config"]
    figures = draw_figures(results, out)
    differences = paired_differences(results)
    write_csv(out / "paired_differences.csv", differences)
    needed, ranking = seeds_to_resolve(differences), ranking_markdown(results)
    recipe = config["recipe"]
    total_time = results["wall_time_s"].sum()
    lines = [
        f"# quantbench comparison: {recipe['model']} on {recipe['dataset']}",
        "",
        f"Made by `{saved['command']}` (config saved in `compare.json`; one row per run in `results.csv`). "
        f"{len(results)} finished runs; summed training time {total_time / 60:.1f} min.",
        *_history_lines(saved),
        "",
        *(["## Summary", "", summary, ""] if (summary := summary_markdown(differences, needed, results)) else []),
        "## Top-1 accuracy (the paper's Table 1 layout)",
        "",
        table1_markdown(results),
        "",
        *_missing_lines(source),
        *_published_lines(results),
        *_sweep_lines(results, config),
        "## Paired difference against LSQ",
        "",
        f"Reference: {reference_label(results)}.",
        "",
        paired_markdown(differences, seeds_needed=needed),
        "",
        *(["## Does the ranking agree with the paper?", "", ranking, ""] if ranking else []),
        "## Figures",
        "",
        *[f"![{path.stem}]({path.name})" for path in figures],
        "",
        *(dynamics_lines(source, results, out) if dynamics else _dynamics_hint(source, results)),
        "## Where this recipe departs from the paper's",
        "",
        *[f"- {note}" for note in departures(config)],
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=2, default=str),
        "```",
        "",
    ]
    return write_text(out / "report.md", "\n".join(lines))
