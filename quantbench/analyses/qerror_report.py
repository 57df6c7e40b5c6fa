"""The report of ``quantbench qerror`` (LSQ section 3.6): tables, the figure and ``report.md`` (the analysis itself is
:mod:`quantbench.analyses.qerror`)."""

from __future__ import annotations

import shlex
from pathlib import Path


from quantbench.utils.io import write_csv, write_text

from quantbench.analyses.qerror import METRICS, METRIC_NAMES, PAPER, QErrorResult


# ---- output ------------------------------------------------------------------------------------------------------


def _pct(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}%"


def layers_markdown(result: QErrorResult) -> str:
    lines = ["| layer | tensor | bits | initial step | learned step s_hat | "
             + " | ".join(f"{m.upper()}: s*/s_hat (diff)" for m in METRICS) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(METRICS)]
    for (layer, kind), group in result.summary.groupby(["layer", "kind"], sort=False):
        by_metric = group.set_index("metric")
        first = group.iloc[0]
        cells = []
        for metric in METRICS:
            ratio, pct = by_metric.loc[metric, "best_ratio"], by_metric.loc[metric, "pct_abs_diff"]
            cells.append("n/a" if ratio != ratio else f"{ratio:.2f} ({_pct(pct)})")
        initial = first["initial_step"]
        initial = "n/a" if initial != initial else f"{initial:.4g}"
        lines.append(f"| {layer} | {kind} | {first['bits']} | {initial} | {first['learned_step']:.4g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def averages_markdown(result: QErrorResult) -> str:
    lines = ["| layers | tensor | layers averaged | " + " | ".join(m.upper() for m in METRICS) + " |",
             "|---|---|---:|" + "---:|" * len(METRICS)]
    for (scope, kind), group in result.averages.groupby(["layers", "kind"], sort=False):
        by_metric = group.set_index("metric")
        cells = [_pct(by_metric.loc[m, "mean_pct_abs_diff"], 1) for m in METRICS]
        counts = "/".join(str(int(by_metric.loc[m, "n_layers"])) for m in METRICS)
        lines.append(f"| {scope} | {kind} | {counts} | " + " | ".join(cells) + " |")
    for kind in ("activation", "weight"):
        lines.append(f"| LSQ paper, 2-bit ResNet-18 (ImageNet) | {kind} | | "
                     + " | ".join(f"{PAPER[(kind, m)]}%" for m in METRICS) + " |")
    return "\n".join(lines)


def draw(result: QErrorResult, path: Path) -> Path:
    """Error versus s / learned step, one panel per metric and tensor kind, one line per layer, learned step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    curves = result.curves.copy()
    bits = curves["layer"].map(result.summary.drop_duplicates("layer").set_index("layer")["bits"])
    curves["series"] = curves["layer"] + " (" + curves["kind"].str[0] + ", " + bits.astype(str) + "-bit)"
    run_bits = result.info["bits"]
    curves["precision"] = (bits == run_bits).map({True: f"{run_bits}-bit", False: "first/last"})
    dashes = {f"{run_bits}-bit": "", "first/last": (4, 2)}
    for metric in ("mae", "mse"):  # relative to the error at the learned step, so layers share an axis
        reference = curves.groupby(["layer", "kind"])[metric].transform(
            lambda s: s.iloc[(curves.loc[s.index, "ratio"] - 1.0).abs().argmin()])
        curves[metric + "_plot"] = curves[metric] / reference
    reference = curves.groupby(["layer", "kind"])["kl"].transform(
        lambda s: s.iloc[(curves.loc[s.index, "ratio"] - 1.0).abs().argmin()])
    curves["kl_plot"] = curves["kl"] - reference
    labels = {"mae_plot": "MAE / MAE at learned step", "mse_plot": "MSE / MSE at learned step",
              "kl_plot": "cross-entropy − value at learned step (nats)"}
    series = list(dict.fromkeys(curves["series"]))
    palette = dict(zip(series, sns.color_palette("colorblind", len(series))))
    rc = {"svg.fonttype": "none"}
    with sns.axes_style("whitegrid"), plt.rc_context(rc):
        figure, axes = plt.subplots(2, 3, figsize=(15, 8.5), squeeze=False)
        for row, kind in enumerate(("weight", "activation")):
            part = curves[curves["kind"] == kind]
            best = result.summary[result.summary["kind"] == kind]
            for col, metric in enumerate(METRICS):
                ax = axes[row][col]
                column = metric + "_plot"
                shown = part[part[column].notna()]
                if len(shown):
                    sns.lineplot(data=shown, x="ratio", y=column, hue="series", palette=palette, estimator=None,
                                 style="precision", dashes=dashes, legend=False, linewidth=1.3, ax=ax)
                    for _, b in best[best["metric"] == metric].dropna(subset=["best_ratio"]).iterrows():
                        points = shown[(shown["layer"] == b["layer"])]
                        if len(points):
                            y = points.loc[(points["ratio"] - b["best_ratio"]).abs().idxmin(), column]
                            color = palette[points["series"].iloc[0]]
                            ax.plot([b["best_ratio"]], [y], marker="o", color=color, markersize=5)
                ax.axvline(1.0, color="0.2", linestyle="--", linewidth=1.0)
                ax.set_xscale("log")
                if metric != "kl":
                    ax.set_yscale("log")
                ax.set_xlim(0.01, 20)
                ax.set_xlabel("s / learned step")
                ax.set_ylabel(labels[column])
                ax.set_title(f"{kind}s: {METRIC_NAMES[metric]}", loc="left", fontsize=10)
        style_of = dict(zip(curves["series"], curves["precision"]))
        handles = [plt.Line2D([0], [0], color=palette[s], linewidth=2,
                              linestyle="--" if style_of[s] == "first/last" else "-") for s in series]
        handles.append(plt.Line2D([0], [0], color="0.2", linestyle="--"))
        handles.append(plt.Line2D([0], [0], color="0.4", marker="o", linestyle=""))
        figure.legend(handles, series + ["learned step", "minimum"], loc="upper center",
                      ncol=min(len(series) + 2, 6), frameon=False, bbox_to_anchor=(0.5, 1.0), fontsize=8.5)
        info = result.info
        note = (f"{info['model']} on {info['dataset']}, {info['quantizer']} {info['bits']}-bit (first/last "
                f"{info['first_last_bits']}-bit); weights, and each layer's input on the first {info['batch_size']} test "
                f"images; s in {{0.01, ..., 20.00}} x learned step. KL: cross-entropy of the non-zero samples under the "
                "quantizer's cells as a histogram density (see report.md).")
        figure.text(0.01, 0.005, note, fontsize=7.5, color="0.25", va="bottom")
        figure.tight_layout(rect=(0, 0.03, 1, 0.93))
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=130, metadata={"Software": None})
        plt.close(figure)
    return path


def _movement(result: QErrorResult) -> str:
    """How far training moved the steps from their initialization (the layer table's 'initial step')."""
    steps = result.summary.drop_duplicates(["layer", "kind"])
    change = (100 * (steps["learned_step"] / steps["initial_step"] - 1)).abs()
    if change.isna().all():
        return "The run has no layers.csv, so the initial steps are unknown."
    parts = []
    for kind in ("weight", "activation"):
        values = change[(steps["kind"] == kind) & (steps["bits"] == result.info["bits"])].dropna()
        if len(values):
            parts.append(f"{kind} steps {values.min():.2g}-{values.max():.2g}%")
    return ("'Initial step' is the step after LSQ's initialization (the run's layers.csv, written before the first "
            f"update). Training moved the {result.info['bits']}-bit layers' " + " and ".join(parts) + " away from it; "
            "where that is small, the comparison above measures the initialization more than what LSQ learns.")


def write_report(result: QErrorResult, out: str | Path, command: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path, curves_path = out / "qerror.csv", out / "curves.csv"
    write_csv(summary_path, result.summary, float_format="%.6g")
    write_csv(out / "averages.csv", result.averages, float_format="%.6g")
    write_csv(curves_path, result.curves, float_format="%.6g")
    figure = draw(result, out / "qerror.png")
    info = result.info
    text = [
        f"# Does the learned step minimize quantization error? ({info['quantizer']} {info['bits']}-bit, "
        f"{info['model']} on {info['dataset']})",
        "",
        "LSQ section 3.6 asks whether the step LSQ learns is the one that minimizes quantization error; for a 2-bit "
        "ResNet-18 it found it is not (28-64% away on average). This report repeats the measurement on our run.",
        "",
        f"Command: `{command}`",
        "",
        f"Run: `{info['run_dir']}`. Samples: each quantized layer's weights, and its input (before quantization) on the "
        f"first {info['batch_size']} test images, model in eval mode. Candidates: s in {{0.01, 0.02, ..., 20.00}} x the "
        f"learned step ({info['candidates']} steps). Percent difference: 100 |s* - s_hat| / s_hat with s* the smallest "
        "minimizing candidate.",
        "",
        "## Averages (percent absolute difference between the learned and the error-minimizing step)",
        "",
        averages_markdown(result),
        "",
        "The paper's rows average over the quantized layers of its network. Its first and last layers are 8-bit and "
        "it does not say whether they were included, so both averages are given; this run's first and last layers are "
        + (f"{info['first_last_bits']}-bit." if info["first_last_bits"] is not None else
           "full precision, so not in the tables.")
        + " Layers whose metric is n/a are left out of that average.",
        "",
        "## Per layer (minimizing s / learned step, and the percent difference)",
        "",
        layers_markdown(result),
        "",
        _movement(result),
        "",
        f"![error versus s / learned step]({figure.name})",
        "",
        "## How each metric is computed",
        "",
        "* MAE = mean |v_hat(s) - v| and MSE = mean (v_hat(s) - v)^2 over the whole sample (zeros included), with "
        "v_hat(s) = clamp(round(v/s), -Q_N, Q_P) s, the quantizer's own grid (checked against its forward).",
        "* KL: the paper keeps the s-dependent term of KL(p||q), -E[log q(v_hat(s))] over the sample, without saying how "
        "q is estimated. Here q is the distribution of v_hat(s) as a density on v's axis: each code's probability "
        "P_j = n_j/N spread uniformly over its rounding cell [(j-1/2)s, (j+1/2)s) (the end codes' cells take in the "
        "clipped values), intersected with the sample's range [min v, max v]; the value reported is "
        "-sum_j P_j log(P_j / w_j) in nats, with cell widths w_j floored at (max v - min v)/N. This is the "
        "cross-entropy of v under a histogram density whose bins are the quantizer's cells, so KL(p||q) >= 0. It is "
        "estimated on the non-zero samples: exact zeros (post-ReLU inputs) are a point mass that every step "
        "represents exactly and no density can (other repeated values, such as a channel's constant response to a "
        "uniform image background, are kept). A sample whose non-zero values are mostly repeats of at most 4 distinct values per quantizer level "
        "(image pixels: 256 values) is discrete, has no density and gets n/a.",
        "* Caveat: the literal readings are degenerate. With q the probability of each code, -E[log q] = H(codes), "
        "which is minimized by the largest step (everything in one code); with q that probability divided by s, "
        "-E[log q] = H(codes) + log s, minimized by the smallest step. `curves.csv` has both "
        "(`kl_literal_pmf`, `kl_literal_density`) for checking; the KL column above is therefore our reading, not "
        "necessarily the paper's. Where a cell edge crosses a value repeated many times (a channel's constant response "
        "to a uniform image background) the KL curve jumps, and KL curves can be flat over a wide range of steps, so "
        "the KL-optimal step is less stable than the MAE- and MSE-optimal ones.",
        "",
        "Files: `qerror.csv` (one row per layer, tensor and metric), `averages.csv`, `curves.csv` (every candidate "
        f"step), `{figure.name}`. Computed in {info['seconds']:.1f} s.",
        "",
    ]
    report = write_text(out / "report.md", "\n".join(text))
    return [report, summary_path, out / "averages.csv", curves_path, figure]


def command_line(run_dir: str, out: str, batch_size: int, data_dir: str | None) -> str:
    parts = ["quantbench qerror", shlex.quote(str(run_dir)), "--out", shlex.quote(str(out))]
    if batch_size != 256:
        parts += ["--batch-size", str(batch_size)]
    if data_dir:
        parts += ["--data-dir", shlex.quote(data_dir)]
    return " ".join(parts)
