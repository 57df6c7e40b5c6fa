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

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

import quantizers
from quantbench.config import TrainConfig, check_bits
from quantbench.errors import QuantbenchError
from quantbench.qat import quantized_layers
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
    device: str = "auto"
    threads: int | None = None

    def resolved(self) -> GradScaleConfig:
        config = GradScaleConfig(**asdict(self))
        if not config.bits:
            raise QuantbenchError("--bits needs at least one bit width, e.g. 2,3,4,8")
        for bits in config.bits:
            check_bits(bits)
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
    if config.device != "auto":
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
    return TrainConfig(
        dataset=config.dataset, model=config.model, out="", quantizer=config.quantizer, bits=bits,
        first_last_bits=config.first_last_bits, quantizer_options=dict(config.quantizer_options),
        init_from=config.init_from, epochs=config.epochs or paper_epochs(bits), batch_size=config.batch_size,
        lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, data_dir=config.data_dir,
        download=config.download, device=config.device, threads=config.threads,
    ).with_paper_defaults()


def measure_one(config: GradScaleConfig, bits: int, data: Any, progress: Any = None) -> tuple[pd.DataFrame, dict]:
    """Fine-tune one precision up to the end of the window; return per-layer rows and this run's metadata."""
    from quantbench.training.loop import Trainer, epoch_loader, lr_at, make_optimizer, seed_everything, train_one_epoch
    from quantbench.training.run import build_model, resolve_device, sample_batch

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

    trainer = Trainer(model, optimizer, train_config, device, iterations_per_epoch)
    probes: list[_Probe] = []
    ratios: list[list[float]] = []
    steps: list[list[float]] = []
    losses: list[float] = []
    task = progress.add_task(f"{bits}-bit", total=end, status="") if progress is not None else None

    def measure(index: int, loss: torch.Tensor, *_: Any) -> None:
        """After each backward, before the update: R's gradients are in .grad (the Figure 4 measurement)."""
        if not math.isfinite(float(loss.detach())):
            raise QuantbenchError(f"{bits}-bit fine-tune diverged at iteration {index} (loss {float(loss)}); "
                                  "lower --lr or start from a full-precision --init-from checkpoint")
        if index >= start:
            probes[:] = probes or _probes(model)
            ratios.append(_unscaled_ratios(probes))
            steps.append([float(p.quantizer.effective_step().detach()) for p in probes])
            losses.append(float(loss.detach()))
        if progress is not None:
            status = "measuring" if index >= start else f"to window at {start}"
            progress.update(task, advance=1, status=f"{status}, loss {float(loss.detach()):.3f}")

    started = time.perf_counter()
    train_one_epoch(trainer, loader, epoch=0, on_step=measure, max_steps=end)  # only up to the end of the window
    wall = time.perf_counter() - started
    if not probes:
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
        "iterations_run": end, "schedule_epochs": train_config.epochs, "lr": train_config.lr,
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

    from quantbench.data import create_dataset

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
