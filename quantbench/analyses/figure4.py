"""LSQ Figure 4 from a ``gradscale`` measurement: medians and spread of R, the paper's three claims, the figure and its
JSON sidecar (the measurement itself is :mod:`quantbench.analyses.gradscale`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from quantbench.utils.plotting import save_reproducible
from quantbench.utils.io import write_csv, write_json

from quantbench.analyses.gradscale import KINDS, SCALES, GradScaleConfig, command_line


# ---- summaries ---------------------------------------------------------------------------------------------------


def _body(df: pd.DataFrame) -> pd.DataFrame:
    """Layers at the network's precision (first/last layers sit at --first-last-bits whatever the precision)."""
    body = df[df["position"] == "body"]
    return body if len(body) else df


def _scale_order(column: pd.Series) -> pd.Series:
    if column.name == "scale":
        return column.map({name: i for i, (name, _, _) in enumerate(SCALES)})
    if column.name == "kind":
        return column.map({kind: i for i, kind in enumerate(KINDS)})
    return column


def medians(df: pd.DataFrame) -> pd.DataFrame:
    """Median R over the body layers per (scale, kind, bits)."""
    table = _body(df).groupby(["scale", "kind", "bits"])["R"].median().reset_index()
    return table.sort_values(by=["scale", "kind", "bits"], key=_scale_order).reset_index(drop=True)


def spread(df: pd.DataFrame) -> pd.DataFrame:
    """Across-layer spread of R per (scale, kind, bits), over the body layers: std of log10 R and max / min."""
    groups = _body(df).groupby(["scale", "kind", "bits"])["R"]
    table = pd.DataFrame({
        "log10_std": groups.apply(lambda r: float(r.map(math.log10).std(ddof=0))),
        "max_over_min": groups.max() / groups.min(),
        "layers": groups.size(),
    }).reset_index()
    return table.sort_values(by=["scale", "kind", "bits"], key=_scale_order).reset_index(drop=True)


#: How :func:`claims` decides, in words (also written to the JSON sidecar).
CLAIM_CRITERIA = {
    "1": "g = 1: the median R is 10^2..10^3 at every precision ('2 to 3 orders of magnitude') and rises with "
         "precision (the paper: 8-bit almost 10x above 2-bit)",
    "2": "g = 1/sqrt(N): the median R is within 10x of 1 at every precision ('the imbalance largely went away') and "
         "the across-layer spread (std of log10 R) is smaller than with g = 1 at every precision; the paper adds that "
         "the precision dependence remains (medians still rise with precision)",
    "3": "g = 1/sqrt(N*Qp): the range of log10 median R across precisions is less than half of that with "
         "g = 1/sqrt(N) ('largely removed'), and the medians stay within 10x of 1",
}


def claims(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The paper's three claims about R (section 3.4), per kind of step, on the body layers (see CLAIM_CRITERIA).

    The paper's argument (Appendix A) and Figure 4's scales are stated for weight steps; activation steps are tested
    the same way, with the reference this module documents (the same layer's weights).
    """
    table = medians(df).set_index(["scale", "kind", "bits"])["R"]
    spreads = spread(df).set_index(["scale", "kind", "bits"])["log10_std"]
    bits = [int(b) for b in sorted(df["bits"].unique())]
    lo, hi = min(bits), max(bits)
    unscaled, numel, full = (name for name, _, _ in SCALES)

    def rising(values: dict[int, float]) -> bool:
        ordered = [values[b] for b in bits]
        return all(later > earlier for earlier, later in zip(ordered, ordered[1:]))

    result: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(df["kind"]), key=KINDS.index):
        log_median = {scale: {b: math.log10(table[(scale, kind, b)]) for b in bits} for scale, _, _ in SCALES}
        layer_std = {scale: {b: float(spreads[(scale, kind, b)]) for b in bits} for scale, _, _ in SCALES}
        precision_range = {scale: max(v.values()) - min(v.values()) for scale, v in log_median.items()}
        near_one = {scale: all(abs(v) <= 1 for v in log_median[scale].values()) for scale in (numel, full)}
        claim1 = {
            "orders_of_magnitude": all(2 <= v <= 3 for v in log_median[unscaled].values()),
            "rises_with_precision": rising(log_median[unscaled]),
            f"median_{hi}bit_over_{lo}bit": 10 ** (log_median[unscaled][hi] - log_median[unscaled][lo]),
        }
        claim2 = {
            "near_one": near_one[numel],
            "smaller_layer_spread": all(layer_std[numel][b] < layer_std[unscaled][b] for b in bits),
            "precision_dependence_remains": rising(log_median[numel]),
        }
        claim3 = {
            "precision_dependence_removed": precision_range[full] < 0.5 * precision_range[numel],
            "near_one": near_one[full],
        }
        result[kind] = {
            "log10_median_R": log_median,
            "across_layer_log10_std": layer_std,
            "log10_range_across_precision": precision_range,
            "claim1": {**claim1, "supported": claim1["orders_of_magnitude"] and claim1["rises_with_precision"]},
            "claim2": {**claim2, "supported": claim2["near_one"] and claim2["smaller_layer_spread"]},
            "claim3": {**claim3, "supported": claim3["precision_dependence_removed"] and claim3["near_one"]},
        }
    return result


def medians_markdown(df: pd.DataFrame) -> str:
    """Median R (body layers) as a markdown table: rows scale x kind, columns precision."""
    table = medians(df)
    bits = sorted(df["bits"].unique())
    lines = ["| scale | step | " + " | ".join(f"{b}-bit" for b in bits) + " |",
             "|---|---|" + "---:|" * len(bits)]
    for (scale, kind), group in table.groupby(["scale", "kind"], sort=False):
        values = dict(zip(group["bits"], group["R"]))
        lines.append(f"| {scale} | {kind} | " + " | ".join(f"{values[b]:.3g}" for b in bits) + " |")
    return "\n".join(lines)


def read_figure4(out: str | Path, stem: str = "figure4") -> pd.DataFrame:
    """A written measurement back as the DataFrame ``write_figure4`` took (CSV rows, attrs from the JSON sidecar)."""
    out = Path(out)
    df = pd.read_csv(out / f"{stem}.csv")
    meta = json.loads((out / f"{stem}.json").read_text())
    df.attrs.update({key: meta.get(key) for key in ("config", "runs", "dataset_source")})
    return df


# ---- output ------------------------------------------------------------------------------------------------------


def draw_figure4(df: pd.DataFrame, path_stem: str | Path) -> list[Path]:
    """The paper's Figure 4 layout: one panel per scale, R (log) per layer, grouped by precision; .png and .svg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    bits = sorted(df["bits"].unique())
    plot = df.copy()
    plot["step"] = plot["kind"].map({"weight": "weight step", "activation": "activation step"})
    plot["layers"] = np.where(plot["position"] == "body", "at the network's precision",
                              "first/last layer (" + plot["layer_bits"].astype(str) + "-bit)")
    # x: precision group, weights left of centre and activations right, a deterministic spread inside each cloud
    slot = {b: i for i, b in enumerate(bits)}
    offset = plot["kind"].map({"weight": -0.2, "activation": 0.2})
    rank = plot.groupby(["scale", "bits", "kind"]).cumcount()
    size = plot.groupby(["scale", "bits", "kind"])["R"].transform("size")
    plot["x"] = plot["bits"].map(slot) + offset + 0.28 * ((rank + 0.5) / size - 0.5)
    table = medians(df)
    palette = {"weight step": sns.color_palette("colorblind")[0], "activation step": sns.color_palette("colorblind")[1]}
    markers = {"at the network's precision": "o"}
    markers.update({label: "X" for label in plot["layers"].unique() if label not in markers})
    rc = {"svg.fonttype": "none", "svg.hashsalt": "quantbench-figure4"}
    with sns.axes_style("whitegrid"), plt.rc_context(rc):
        figure, axes = plt.subplots(1, len(SCALES), figsize=(4.4 * len(SCALES), 4.4), sharey=True)
        for panel, (ax, (scale, _, title)) in enumerate(zip(axes, SCALES)):
            sns.scatterplot(data=plot[plot["scale"] == scale], x="x", y="R", hue="step", style="layers",
                            hue_order=list(palette), palette=palette, markers=markers, s=28, alpha=0.8,
                            linewidth=0.3, edgecolor="white", legend=panel == len(SCALES) - 1, ax=ax)
            for kind, shift in (("weight", -0.2), ("activation", 0.2)):
                rows = table[(table["scale"] == scale) & (table["kind"] == kind)]
                for _, row in rows.iterrows():
                    centre = slot[row["bits"]] + shift
                    ax.plot([centre - 0.17, centre + 0.17], [row["R"]] * 2, color="0.15", linewidth=1.6)
            ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.9)
            ax.set_yscale("log")
            ax.set_xticks(range(len(bits)), [f"{b}-bit" for b in bits])
            ax.set_xlim(-0.6, len(bits) - 0.4)
            ax.set_xlabel("precision")
            ax.set_ylabel("R  (relative step-size / weight update)" if panel == 0 else "")
            ax.set_title(title)
        legend = axes[-1].get_legend()
        if legend is not None:
            handles, labels = axes[-1].get_legend_handles_labels()
            legend.remove()
            keep = [(h, l) for h, l in zip(handles, labels) if l not in ("step", "layers")]
            figure.legend([h for h, _ in keep], [l for _, l in keep], loc="upper center", ncol=len(keep),
                          frameon=False, bbox_to_anchor=(0.5, 1.0), fontsize=8.5)
        config = df.attrs.get("config", {})
        runs = df.attrs.get("runs", [])
        window = f"iterations {runs[0]['window'][0]}-{runs[0]['window'][1] - 1} of {runs[0]['iterations_per_epoch']}" \
            if runs else "the window"
        note = (f"{config.get('model', '')} on {config.get('dataset', '')}, LSQ fine-tuned with g = 1/sqrt(N·Q_P); "
                f"R per layer = mean over {window} (middle of epoch 1) of the per-iteration R, recomputed for each g "
                "from the unscaled step gradient. N: the layer's weight count (weight steps) or the numel of its input "
                f"{'per sample' if config.get('quantizer_options', {}).get('activation_n') == 'sample' else 'batch'} "
                "(activation steps); activation steps are compared with their own layer's weights. "
                "Bars: median over layers at the network's precision; dashed: R = 1.")
        figure.text(0.01, 0.01, note, fontsize=7, va="bottom", ha="left", color="0.25", wrap=True)
        figure.tight_layout(rect=(0, 0.07, 1, 0.92))
        written = save_reproducible(figure, path_stem)
        plt.close(figure)
    return written


def sidecar(df: pd.DataFrame, command: str | None = None) -> dict[str, Any]:
    config = df.attrs.get("config", {})
    table = medians(df)
    return {
        "figure": "LSQ (Esser et al. 2020) Figure 4: R = (|dL/ds|/s) / (||dL/dw||/||w||) under three gradient scales",
        "command": command or (command_line(GradScaleConfig(**config)) if config else None),
        "config": config,
        "dataset_source": df.attrs.get("dataset_source"),
        "definitions": {
            "R": "mean over the window of the per-iteration R (not the ratio of mean gradients)",
            "R_under_scale": "g * R_unscaled with g = 1, 1/sqrt(N), 1/sqrt(N*Qp); training itself used the quantizer's "
                             "own scale (grad_scale in runs[].quantizer_options, 'full' by default)",
            "activation_reference": "an activation step is compared with the weights of the layer whose input it "
                                    "quantizes",
            "N": "weight step: the weight count; activation step: the batch tensor's numel (activation_n=batch) "
                 "or per sample (activation_n=sample)",
            "medians": "over the body layers (position == body); first/last layers sit at --first-last-bits",
            "window": "[E//2 - iters//2, E//2 - iters//2 + iters) with E iterations per epoch (drop_last)",
        },
        "runs": df.attrs.get("runs", []),
        "medians": {scale: {kind: {str(int(row["bits"])): float(row["R"]) for _, row in rows.iterrows()}
                            for kind, rows in group.groupby("kind", sort=False)}
                    for scale, group in table.groupby("scale", sort=False)},
        "across_layer_spread": spread(df).to_dict(orient="records"),
        "claim_criteria": CLAIM_CRITERIA,
        "claims": claims(df),
    }


def write_figure4(df: pd.DataFrame, out: str | Path, stem: str = "figure4", command: str | None = None) -> list[Path]:
    """Write ``<out>/<stem>.csv``, ``.json`` (config, command, windows, medians, claims), ``.png`` and ``.svg``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    write_csv(csv_path, df, float_format="%.10g")
    json_path = out / f"{stem}.json"
    write_json(json_path, sidecar(df, command))
    return [csv_path, json_path, *draw_figure4(df, out / stem)]
