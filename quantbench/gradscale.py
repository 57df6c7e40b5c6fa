"""LSQ's step-size gradient scale measured: the ratio R of Esser et al. (ICLR 2020), section 3.4 and Figure 4.

    R = (|dL/ds| / s) / (||dL/dw|| / ||w||)                                    (LSQ eq. 4)

compares how fast a step size s moves, relative to its size, with how fast the weights w move. The paper argues R
should be near 1 and that without a gradient scale it is about sqrt(N * Q_P) (Appendix A), so it multiplies the step
gradient by g = 1/sqrt(N * Q_P). ``measure_gradscale`` checks this on any registered model and dataset:

1. For each precision, build the model (optionally from a full-precision checkpoint, as the paper does), quantize it
   with LSQ and fine-tune it the way ``quantbench train`` does (SGD momentum 0.9, cosine LR, the paper's LR and weight
   decay by bits) with the paper's *full* gradient scale, so training is the stable one the paper used.
2. Over ``iters`` iterations centred on the middle of the first epoch, i.e. iterations
   ``[E//2 - iters//2, E//2 - iters//2 + iters)`` with E iterations per epoch, read after every backward pass, for
   every quantized layer, the step gradients of its weight quantizer and of its input (activation) quantizer. The
   gradient autograd leaves on ``step_size`` is ``g_used * dL/ds_unscaled`` (LSQ's Function multiplies by g; the
   positivity guard ``abs().clamp_min()`` is the identity for a positive step and only flips the sign otherwise, which
   ``|.|`` removes), so the unscaled gradient is ``.grad / g_used`` with the deterministic
   ``g_used = lsq_grad_scale(q.grad_scale, q.last_n, q.qp, q.grad_scale_mult)``.
3. Per iteration, R_unscaled = (|dL/ds_unscaled| / s) / (||dL/dw|| / ||w||), and R under a scale g' is
   g' * R_unscaled, for g' = 1, 1/sqrt(N) and 1/sqrt(N * Q_P) (N = ``q.last_n``: the weight count for a weight step;
   for an activation step the batch tensor's numel by default, or per sample with ``activation_n="sample"``).
4. R is averaged per layer over the window: the **mean of the per-iteration R**, not the ratio of mean gradients.

Which weights an activation step is compared with: the paper does not say. Here, **the weights of the same layer**,
the Conv2d/Linear whose input that activation quantizer quantizes (its ``w`` and ``dL/dw``).

Only the training is stopped early: we run up to the end of the window, never the rest of the epoch. The LR schedule is
planned for the paper's training length (90 epochs at 2-4 bits, 1 epoch at 8 bits) unless ``epochs`` says otherwise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

import quantizers
from quantbench.plotting import save_reproducible
from quantbench.errors import QuantbenchError
from quantbench.quantize import quantized_layers, regularization
from quantizers.lsq import LSQ, lsq_grad_scale

#: The three scales of the paper's Figure 4, left to right: (CSV name, lsq_grad_scale mode, axis title).
SCALES: tuple[tuple[str, str, str], ...] = (
    ("1", "none", "g = 1"),
    ("1/sqrt(N)", "numel", "g = 1/sqrt(N)"),
    ("1/sqrt(N*Qp)", "full", "g = 1/sqrt(N·Q_P)"),
)
KINDS = ("weight", "activation")
CSV_COLUMNS = [
    "layer", "kind", "bits", "scale", "R", "position", "layer_bits", "n", "qp", "g", "log10_R_std", "iterations",
    "step_mean",
]
#: The paper's training length by bits (section 2.3), which sets the cosine schedule's horizon.
PAPER_EPOCHS_8BIT, PAPER_EPOCHS_LOW = 1, 90


def paper_epochs(bits: int) -> int:
    """LSQ trained 8-bit networks for 1 epoch and 2-, 3-, 4-bit networks for 90 (section 2.3)."""
    return PAPER_EPOCHS_8BIT if bits >= 8 else PAPER_EPOCHS_LOW


@dataclass
class GradScaleConfig:
    dataset: str = "digits"
    model: str = "small_cnn"
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    iters: int = 500
    init_from: str | None = None
    batch_size: int = 128
    first_last_bits: int | None = 8  # None: first and last layers stay full precision (then not measured)
    quantizer: str = "lsq"  # LSQ or a registered subclass of it
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None  # the cosine schedule's planned length; None: the paper's by bits
    lr: float | None = None  # None: the paper's by bits
    weight_decay: float | None = None  # None: the paper's by bits
    seed: int = 0
    data_dir: str | None = None
    download: bool = False
    device: str = "cpu"
    threads: int | None = None

    def resolved(self) -> GradScaleConfig:
        config = GradScaleConfig(**asdict(self))
        if not config.bits:
            raise QuantbenchError("--bits needs at least one bit width, e.g. 2,3,4,8")
        for bits in config.bits:
            if not quantizers.MIN_BITS <= bits <= quantizers.MAX_BITS:
                raise QuantbenchError(f"--bits {bits} is out of range: choose 2..16")
        config.bits = sorted(set(config.bits))
        if config.iters < 1:
            raise QuantbenchError(f"--iters must be at least 1, got {config.iters}")
        if config.batch_size < 1:
            raise QuantbenchError(f"--batch-size must be at least 1, got {config.batch_size}")
        if config.epochs is not None and config.epochs < 1:
            raise QuantbenchError(f"--epochs must be at least 1, got {config.epochs}")
        if not issubclass(quantizers.get(config.quantizer), LSQ):
            raise QuantbenchError(
                f"gradscale measures LSQ's gradient scale: --quantizer {config.quantizer} is not LSQ or an LSQ subclass"
            )
        return config


def measurement_window(iterations_per_epoch: int, iters: int) -> tuple[int, int]:
    """``[start, end)``: ``iters`` iterations centred on the middle of the first epoch."""
    if iters > iterations_per_epoch:
        raise QuantbenchError(
            f"--iters {iters} does not fit in one epoch of {iterations_per_epoch} iterations: use --iters "
            f"{iterations_per_epoch} or less, or a smaller --batch-size"
        )
    start = iterations_per_epoch // 2 - iters // 2
    return start, start + iters


def command_line(config: GradScaleConfig) -> str:
    """The ``quantbench gradscale`` invocation that reproduces ``config``."""
    parts = ["quantbench gradscale", f"--dataset {config.dataset}", f"--model {config.model}",
             f"--bits {','.join(map(str, config.bits))}", f"--iters {config.iters}",
             f"--batch-size {config.batch_size}", f"--seed {config.seed}"]
    if config.init_from:
        parts.append(f"--init-from {config.init_from}")
    if config.first_last_bits != 8:
        parts.append(f"--first-last-bits {config.first_last_bits if config.first_last_bits is not None else 'fp'}")
    if config.quantizer != "lsq":
        parts.append(f"--quantizer {config.quantizer}")
    parts += [f"--set {key}={value}" for key, value in config.quantizer_options.items()]
    for flag, value in (("--epochs", config.epochs), ("--lr", config.lr), ("--weight-decay", config.weight_decay),
                        ("--data-dir", config.data_dir), ("--threads", config.threads)):
        if value is not None:
            parts.append(f"{flag} {value}")
    if config.device != "cpu":
        parts.append(f"--device {config.device}")
    return " ".join(parts)


# ---- measurement -------------------------------------------------------------------------------------------------


@dataclass
class _Probe:
    """One step size to watch: a layer's weight or input quantizer, with the layer's weight as the reference."""

    layer: str
    kind: str
    position: str
    quantizer: LSQ
    weight: torch.nn.Parameter


def _probes(model: torch.nn.Module) -> list[_Probe]:
    layers = quantized_layers(model)
    probes = []
    for index, (name, layer) in enumerate(layers):
        position = "first" if index == 0 else "last" if index == len(layers) - 1 else "body"
        for kind, quantizer in (("weight", layer.weight_quantizer), ("activation", layer.input_quantizer)):
            if isinstance(quantizer, LSQ):
                probes.append(_Probe(name, kind, position, quantizer, layer.weight))
    if not probes:
        raise QuantbenchError("the model has no LSQ-quantized layer to measure")
    return probes


def _unscaled_ratios(probes: Sequence[_Probe]) -> list[float]:
    """R_unscaled of every probe for the gradients now in ``.grad`` (NaN where the weight gradient is zero)."""
    values = []
    for probe in probes:
        q = probe.quantizer
        g_used = lsq_grad_scale(q.grad_scale, q.last_n, q.qp, q.grad_scale_mult)
        step = float(q.effective_step().detach())
        grad_s = q.step_size.grad
        grad_w = probe.weight.grad
        if grad_s is None or grad_w is None or g_used == 0:
            values.append(float("nan"))
            continue
        step_rate = abs(float(grad_s)) / abs(g_used) / step
        weight_rate = float(grad_w.detach().norm()) / float(probe.weight.detach().norm())
        values.append(step_rate / weight_rate if weight_rate > 0 and math.isfinite(weight_rate) else float("nan"))
    return values


def _train_config(config: GradScaleConfig, bits: int):
    from quantbench.train import TrainConfig

    return TrainConfig(
        dataset=config.dataset, model=config.model, out="", quantizer=config.quantizer, bits=bits,
        first_last_bits=config.first_last_bits, quantizer_options=dict(config.quantizer_options),
        init_from=config.init_from, epochs=config.epochs or paper_epochs(bits), batch_size=config.batch_size,
        lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, data_dir=config.data_dir,
        download=config.download, device=config.device, threads=config.threads,
    ).resolved()


def measure_one(config: GradScaleConfig, bits: int, data: Any, progress: Any = None) -> tuple[pd.DataFrame, dict]:
    """Fine-tune one precision up to the end of the window; return per-layer rows and this run's metadata."""
    from quantbench.train import build_model, epoch_loader, lr_at, make_optimizer, resolve_device, sample_batch, seed_everything

    train_config = _train_config(config, bits)
    device = resolve_device(config.device)
    seed_everything(config.seed)  # every precision starts from the same state and sees the same batches
    model, _ = build_model(train_config, data, sample_batch(data, config.batch_size))
    model.to(device).train()
    optimizer = make_optimizer(model, train_config)
    iterations_per_epoch = len(data.train) // config.batch_size
    start, end = measurement_window(iterations_per_epoch, config.iters)
    total_steps = iterations_per_epoch * train_config.epochs
    loader = epoch_loader(data, train_config, epoch=0)  # the batches train() sees in its first epoch

    probes: list[_Probe] | None = None
    ratios: list[list[float]] = []
    steps: list[list[float]] = []
    losses: list[float] = []
    task = progress.add_task(f"{bits}-bit", total=end, status="") if progress is not None else None
    started = time.perf_counter()
    for index, (images, labels) in enumerate(loader):
        if index >= end:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(train_config, index, total_steps)
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels) + regularization(model).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(float(loss.detach())):
            raise QuantbenchError(f"{bits}-bit fine-tune diverged at iteration {index} (loss {float(loss)}); "
                                  "lower --lr or start from a full-precision --init-from checkpoint")
        if index >= start:
            probes = probes or _probes(model)
            ratios.append(_unscaled_ratios(probes))
            steps.append([float(p.quantizer.effective_step().detach()) for p in probes])
            losses.append(float(loss.detach()))
        optimizer.step()
        if progress is not None:
            status = "measuring" if index >= start else f"to window at {start}"
            progress.update(task, advance=1, status=f"{status}, loss {float(loss.detach()):.3f}")
    wall = time.perf_counter() - started
    if probes is None:
        raise QuantbenchError("the measurement window was never reached (the training split is too small)")

    per_iteration = torch.tensor(ratios, dtype=torch.float64)  # iterations x probes
    valid = per_iteration.isfinite()  # NaN: a zero weight gradient or step that iteration (R undefined)
    rows = []
    for column, probe in enumerate(probes):
        q = probe.quantizer
        values = per_iteration[valid[:, column], column]
        mean_unscaled = float(values.mean()) if values.numel() else float("nan")
        positive = values[values > 0]
        log_std = float(positive.log10().std()) if positive.numel() > 1 else float("nan")
        for scale, mode, _ in SCALES:
            g = lsq_grad_scale(mode, q.last_n, q.qp)
            rows.append({
                "layer": probe.layer, "kind": probe.kind, "bits": bits, "scale": scale, "R": g * mean_unscaled,
                "position": probe.position, "layer_bits": q.bits, "n": q.last_n, "qp": q.qp, "g": g,
                "log10_R_std": log_std, "iterations": int(values.numel()),
                "step_mean": float(torch.tensor([row[column] for row in steps]).mean()),
            })
    meta = {
        "bits": bits, "iterations_per_epoch": iterations_per_epoch, "window": [start, end],
        "iterations_run": min(end, index + 1), "schedule_epochs": train_config.epochs, "lr": train_config.lr,
        "weight_decay": train_config.weight_decay, "lr_in_window": [lr_at(train_config, start, total_steps),
                                                                    lr_at(train_config, end - 1, total_steps)],
        "train_loss_window_mean": sum(losses) / len(losses), "wall_time_s": wall,
        "quantizer_options": probes[0].quantizer.options(),
    }
    return pd.DataFrame(rows, columns=CSV_COLUMNS), meta


def measure_gradscale(config: GradScaleConfig, progress: bool = False) -> pd.DataFrame:
    """Measure R for every precision in ``config.bits``; one row per (layer, kind, bits, scale).

    ``df.attrs["runs"]`` holds each precision's metadata (window, LR, wall time) and ``df.attrs["config"]`` the
    resolved config.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from quantbench.datasets import create_dataset

    config = config.resolved()
    if config.threads:
        torch.set_num_threads(config.threads)
    data = create_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
    measurement_window(len(data.train) // config.batch_size, config.iters)  # fail before any training
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not progress)
    frames, runs = [], []
    with bar:
        for bits in config.bits:
            frame, meta = measure_one(config, bits, data, bar if progress else None)
            frames.append(frame)
            runs.append(meta)
    df = pd.concat(frames, ignore_index=True)
    df.attrs["config"] = asdict(config)
    df.attrs["runs"] = runs
    df.attrs["dataset_source"] = data.source
    return df


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
    df.to_csv(csv_path, index=False, float_format="%.10g")
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(sidecar(df, command), indent=2, default=str) + "\n")
    return [csv_path, json_path, *draw_figure4(df, out / stem)]
