"""LSQ section 3.6: does the learned step minimize quantization error?

For every quantized layer of a trained run, and each of its two quantized tensors (the weights, and the layer's input
on one batch of test data, captured before quantization), evaluate the quantization error of the uniform quantizer
``v_hat(s) = clamp(round(v/s), -Q_N, Q_P) * s`` at every ``s`` in ``S = {0.01, 0.02, ..., 20.00} * s_hat`` (``s_hat``
the learned step) for three metrics, and report the minimizing step of each and its percent absolute difference
``100 |s* - s_hat| / s_hat``, per layer and averaged over weight layers and activation layers, as in the paper.

Metrics (``v`` the sample, N its size):

* ``mae`` = mean |v_hat(s) - v|, ``mse`` = mean (v_hat(s) - v)^2, over the whole sample;
* ``kl``: the paper drops the s-independent term of KL(p || q) and approximates the rest as -E[log q(v_hat(s))] over
  the sample. Here ``q`` is the distribution of ``v_hat(s)`` written as a density on v's axis: the probability
  ``P_j = n_j / N`` of code ``j`` spread uniformly over the inputs that quantize to it, i.e. over its rounding cell
  ``[(j - 1/2) s, (j + 1/2) s)`` (the two end codes' cells extend to -inf / +inf and take in the clipped values),
  intersected with the sample's range ``[min v, max v]``; so ``q(v_hat_j) = P_j / w_j`` and the reported value is
  ``-sum_j P_j log(P_j / w_j)`` (nats). Evaluating q at v_hat or at v is the same thing, since q is constant on a cell,
  and q is a proper density on [min v, max v], so KL(p || q) >= 0: a histogram of v with the quantizer's own cells.
  Cell widths are floored at (max v - min v) / N (one sample's share of the range) so a cell holding a lone extreme
  sample cannot make q spike. The density is estimated on the **non-zero** samples only: exact zeros (after a ReLU,
  often half the activations) are a point mass that every candidate step represents exactly and that no density
  can, and that would otherwise reward s -> 0 (other repeated values, e.g. the constant response of a channel to
  an image's uniform background, are kept). A sample whose non-zero values are mostly repeats (fewer distinct
  values than half their number) of at most 4 distinct values per quantizer level is discrete (image pixels take
  256 values) and has no density: its KL is not estimated (NaN).

  Caveat: the paper does not say how it estimated q. The two literal readings are degenerate and therefore not
  used: q = the probability mass of each code gives -E[log q] = H(codes), minimized by the largest step (every value
  in one code); q = the mass divided by the nominal step gives H(codes) + log s, minimized by the smallest step.
  ``kl_literal_pmf`` / ``kl_literal_density`` in ``curves.csv`` record both so this can be checked.

The errors are computed exactly for all 2000 steps at once from the sorted sample and its prefix sums (each step needs
only the positions of the 2^b - 1 cell edges and 2^b levels, found by binary search), in float64. The quantizer's own
forward is used to check the grid: at the learned step, and at three other candidate steps placed with ``set_step`` on a
copy, it must agree with the formula above (QuantbenchError otherwise: the analysis is for uniform-step quantizers,
such as lsq and fixed; PACT's clip quantizer and QIL at gamma = 1 also pass).
"""

from __future__ import annotations

import copy
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

import quantizers
from quantbench.errors import QuantbenchError
from quantbench.integer import LoadedRun, first_test_batch, load_run
from quantbench.quantize import quantized_layers

METRICS = ("mae", "mse", "kl")
#: a sample whose non-zero values are mostly repeats of at most this many distinct values per quantizer level is
#: discrete (image pixels): no KL
DISCRETE_FACTOR = 4
METRIC_NAMES = {"mae": "mean absolute error", "mse": "mean squared error", "kl": "KL divergence (cross-entropy term)"}
#: the paper's candidate set: {0.01, 0.02, ..., 20.00} x the learned step
RATIOS = torch.arange(1, 2001, dtype=torch.float64) / 100
#: the paper's averages (2-bit ResNet-18 on ImageNet), percent absolute difference
PAPER = {("activation", "mae"): 50, ("activation", "mse"): 63, ("activation", "kl"): 64,
         ("weight", "mae"): 47, ("weight", "mse"): 28, ("weight", "kl"): 46}


@dataclass
class Sample:
    """One quantized tensor of one layer: its values, its quantizer's learned step and integer code range."""

    layer: str
    kind: str  # "weight" or "activation"
    bits: int
    quantizer: str
    values: Tensor
    step: float
    lo: int
    hi: int


# ---- the grid and its check -------------------------------------------------------------------------------------


def _grid_values(values: Tensor, step: float, lo: int, hi: int) -> Tensor:
    return torch.clamp(torch.round(values / step), lo, hi) * step


def code_range(quantizer: quantizers.Quantizer, step: float, where: str) -> tuple[float, int, int]:
    """The step and integer code range of a uniform-step quantizer, read from ``levels()``.

    ``step`` (``current_step()``) is kept when the levels are integer multiples of it; otherwise (a step recovered
    from float32 level gaps) the span of the levels over their count is used.
    """
    levels = quantizer.levels().detach().double().flatten().sort().values
    if levels.numel() >= 2:
        for candidate in (step, float(levels[-1] - levels[0]) / (levels.numel() - 1)):
            codes = levels / candidate
            if float((codes - codes.round()).abs().max()) < 1e-3 and \
                    levels.numel() == int(codes.round().max() - codes.round().min()) + 1:
                return candidate, int(codes.round().min()), int(codes.round().max())
    raise QuantbenchError(
        f"{where}: quantizer '{quantizer.registry_name}' is not a uniform grid of integer multiples of one step "
        "(qerror evaluates uniform-step quantizers such as lsq and fixed)"
    )


def check_grid(quantizer: quantizers.Quantizer, values: Tensor, step: float, lo: int, hi: int, where: str) -> None:
    """The quantizer's own forward must be ``clamp(round(v/s), lo, hi) * s`` at its learned step and, placed with
    ``set_step`` on a copy, at other candidate steps (float32 ties at the cell edges excepted)."""
    candidates = [(quantizer, step)]
    for ratio in (0.37, 2.9, 11.3):
        placed = copy.deepcopy(quantizer)
        placed.set_step(step * ratio)
        candidates.append((placed, placed.current_step()))
    with torch.no_grad():
        for candidate, s in candidates:
            out = candidate(values).double()
            expected = _grid_values(values.double(), s, lo, hi)
            wrong = int(((out - expected).abs() > 1e-4 * s).sum())
            if wrong > max(1, values.numel() // 10_000):
                raise QuantbenchError(
                    f"{where}: quantizer '{quantizer.registry_name}' at step {s:.4g} does not quantize as "
                    f"clamp(round(v/s), {lo}, {hi}) * s ({wrong} of {values.numel()} values differ); qerror evaluates "
                    "uniform-step quantizers (lsq, fixed; QIL only at gamma = 1)"
                )


# ---- the errors -------------------------------------------------------------------------------------------------


def error_curves(values: Tensor, step: float, lo: int, hi: int, ratios: Tensor = RATIOS) -> dict[str, Tensor]:
    """MAE, MSE and the KL cross-entropy term (module docstring) at each ``ratios * step``, exactly, in float64."""
    x = values.detach().flatten().double().sort().values
    n = x.numel()
    steps = ratios.double() * step
    codes = torch.arange(lo, hi + 1, dtype=torch.float64)
    levels = steps[:, None] * codes[None]
    edges = (steps[:, None] * (codes[:-1] + 0.5)[None]).contiguous()
    out = {"ratio": ratios.double(), "step": steps}

    zero = x.new_zeros(1)
    c1 = torch.cat([zero, x.cumsum(0)])
    c2 = torch.cat([zero, (x * x).cumsum(0)])
    inner = torch.searchsorted(x, edges)  # values below each cell edge
    start = torch.cat([torch.zeros_like(inner[:, :1]), inner], 1)
    end = torch.cat([inner, torch.full_like(inner[:, :1], n)], 1)
    middle = torch.searchsorted(x, levels.contiguous()).clamp(start, end)
    count = (end - start).double()
    s1, s2 = c1[end] - c1[start], c2[end] - c2[start]
    out["mse"] = ((s2 - 2 * levels * s1 + levels**2 * count).clamp_min(0).sum(1) / n)
    below, above = (middle - start).double(), (end - middle).double()
    out["mae"] = (levels * below - (c1[middle] - c1[start]) + (c1[end] - c1[middle]) - levels * above).clamp_min(0).sum(1) / n

    nonzero = x[x != 0]
    m = nonzero.numel()
    probabilities = None
    distinct = torch.unique_consecutive(nonzero).numel() if m else 0
    if m >= 2 and not (distinct <= DISCRETE_FACTOR * (hi - lo + 1) and distinct < m / 2):
        cut = torch.searchsorted(nonzero, edges)
        lower = torch.cat([torch.zeros_like(cut[:, :1]), cut], 1)
        upper = torch.cat([cut, torch.full_like(cut[:, :1], m)], 1)
        probabilities = (upper - lower).double() / m
        low, high = float(nonzero[0]), float(nonzero[-1])
        left = torch.cat([torch.full_like(edges[:, :1], low), edges.clamp(low, high)], 1)
        right = torch.cat([edges.clamp(low, high), torch.full_like(edges[:, :1], high)], 1)
        widths = (right - left).clamp_min((high - low) / m)
        logp = torch.where(probabilities > 0, probabilities.clamp_min(1e-300).log(), 0.0)
        entropy = -(probabilities * logp).sum(1)
        out["kl"] = entropy + (probabilities * widths.log()).sum(1)
        out["kl_literal_pmf"] = entropy
        out["kl_literal_density"] = entropy + steps.log()
    else:
        nan = torch.full_like(steps, float("nan"))
        out["kl"] = out["kl_literal_pmf"] = out["kl_literal_density"] = nan
    return out


# ---- collecting the samples ---------------------------------------------------------------------------------------


def collect_samples(run: LoadedRun, batch_size: int = 256) -> tuple[list[Sample], int]:
    """Weights and (on the first ``batch_size`` test images) inputs of every quantized layer, with their steps."""
    images, _ = first_test_batch(run.data, batch_size)
    layers = quantized_layers(run.model)
    if not layers:
        raise QuantbenchError(f"{run.directory}: the model has no quantized layer")
    inputs: dict[str, Tensor] = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0].detach()))
               for name, layer in layers]
    try:
        with torch.no_grad():
            run.model(images)
    finally:
        for handle in handles:
            handle.remove()
    samples = []
    for name, layer in layers:
        for kind, quantizer, values in (("weight", layer.weight_quantizer, layer.weight.detach()),
                                        ("activation", layer.input_quantizer, inputs.get(name))):
            if quantizer is None or values is None:
                continue
            where = f"layer {name} ({kind})"
            step, lo, hi = code_range(quantizer, float(quantizer.current_step()), where)
            check_grid(quantizer, values, step, lo, hi, where)
            samples.append(Sample(name, kind, quantizer.bits, quantizer.registry_name, values, step, lo, hi))
    return samples, int(images.shape[0])


# ---- the analysis -------------------------------------------------------------------------------------------------


@dataclass
class QErrorResult:
    curves: pd.DataFrame  # one row per (layer, kind, ratio)
    summary: pd.DataFrame  # one row per (layer, kind, metric)
    averages: pd.DataFrame  # one row per (layers, kind, metric)
    info: dict[str, Any]


def analyze(run_dir: str | Path, batch_size: int = 256, data_dir: str | None = None) -> QErrorResult:
    started = time.perf_counter()
    run = load_run(run_dir, data_dir)
    samples, images = collect_samples(run, batch_size)
    loaded = time.perf_counter() - started
    frames, rows = [], []
    for sample in samples:
        curves = error_curves(sample.values, sample.step, sample.lo, sample.hi)
        frame = pd.DataFrame({key: value.numpy() for key, value in curves.items()})
        frame.insert(0, "kind", sample.kind)
        frame.insert(0, "layer", sample.layer)
        frames.append(frame)
        at_learned = frame.loc[(frame["ratio"] - 1.0).abs().idxmin()]
        for metric in METRICS:
            column = frame[metric]
            if column.isna().all():
                best_ratio = best_step = pct = float("nan")
                best_value = float("nan")
            else:
                best = int(column.to_numpy().argmin())  # first minimum: the smallest minimizing step
                best_ratio = float(frame["ratio"].iloc[best])
                best_step = float(frame["step"].iloc[best])
                best_value = float(column.iloc[best])
                pct = 100.0 * abs(best_ratio - 1.0)
            rows.append({
                "layer": sample.layer, "kind": sample.kind, "bits": sample.bits, "quantizer": sample.quantizer,
                "elements": sample.values.numel(), "zero_fraction": float((sample.values == 0).double().mean()),
                "learned_step": sample.step, "metric": metric, "best_step": best_step, "best_ratio": best_ratio,
                "pct_abs_diff": pct, "error_at_learned": float(at_learned[metric]), "error_at_best": best_value,
            })
    summary = pd.DataFrame(rows)
    summary.insert(summary.columns.get_loc("learned_step") + 1, "initial_step", _initial_steps(run, summary))
    run_bits = run.config.bits
    averages = []
    for scope, frame in (("run bits", summary[summary["bits"] == run_bits]), ("all quantized", summary)):
        for (kind, metric), group in frame.groupby(["kind", "metric"], sort=False):
            values = group["pct_abs_diff"].dropna()
            averages.append({"layers": f"{run_bits}-bit layers" if scope == "run bits" else "all quantized layers",
                             "kind": kind, "metric": metric, "n_layers": int(values.size),
                             "mean_pct_abs_diff": float(values.mean()) if values.size else float("nan"),
                             "paper": PAPER.get((kind, metric))})
    info = {
        "run_dir": str(run_dir), "dataset": run.config.dataset, "model": run.config.model,
        "quantizer": run.config.quantizer, "bits": run_bits, "first_last_bits": run.config.first_last_bits,
        "batch_size": images, "candidates": int(RATIOS.numel()), "load_seconds": loaded,
        "seconds": time.perf_counter() - started,
    }
    return QErrorResult(pd.concat(frames, ignore_index=True), summary, pd.DataFrame(averages), info)


def _initial_steps(run: LoadedRun, summary: pd.DataFrame) -> list[float]:
    """Each step at initialization, from the run's ``layers.csv`` (written after the first forward pass, before the
    first update); NaN when the run has none."""
    path = run.directory / "layers.csv"
    table = pd.read_csv(path).set_index("layer") if path.is_file() else pd.DataFrame()
    steps = []
    for layer, kind in zip(summary["layer"], summary["kind"]):
        column = f"{kind}_step"
        value = table.at[layer, column] if layer in table.index and column in table.columns else float("nan")
        steps.append(float(value) if value == value else float("nan"))
    return steps


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
    result.summary.to_csv(summary_path, index=False, float_format="%.6g")
    result.averages.to_csv(out / "averages.csv", index=False, float_format="%.6g")
    result.curves.to_csv(curves_path, index=False, float_format="%.6g")
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
    report = out / "report.md"
    report.write_text("\n".join(text))
    return [report, summary_path, out / "averages.csv", curves_path, figure]


def command_line(run_dir: str, out: str, batch_size: int, data_dir: str | None) -> str:
    parts = ["quantbench qerror", shlex.quote(str(run_dir)), "--out", shlex.quote(str(out))]
    if batch_size != 256:
        parts += ["--batch-size", str(batch_size)]
    if data_dir:
        parts += ["--data-dir", shlex.quote(data_dir)]
    return " ".join(parts)
