"""One training run: full-precision training, or quantized fine-tuning from a full-precision checkpoint.

``train(TrainConfig(...))`` writes one directory per run:

    config.json       the resolved config: every default filled in, quantizer conventions included
    layers.csv        the layer table (layer, bits, quantizer, activation sign, N for the gradient scale, steps)
    epochs.csv        per-epoch metrics
    metrics.json      final top1, top5 (percent), wall_time_s, model_size_bits, num_classes (written last, atomically)
    environment.json  package versions, git commit, machine
    checkpoint.pt     model, optimizer, schedule and RNG state after the latest epoch (for --resume)
    model.pt          the final weights (a state_dict; what --init-from reads)

Recipe defaults are the LSQ paper's (section 3.1 / spec 1.5): SGD momentum 0.9, cosine decay without restarts,
LR 0.1 full precision / 0.01 at 2-4 bits / 0.001 at 8 bits, weight decay 1e-4 at 4 and 8 bits, 0.5e-4 at 3 bits,
0.25e-4 at 2 bits. Quantizer parameters form their own optimizer group with no weight decay (PACT's alpha gets its
own L2 through ``regularization()``). Optional knowledge distillation from the full-precision teacher (section 3.7:
temperature 1, equal weights).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

import quantizers
from quantbench.datasets import create_dataset
from quantbench.errors import QuantbenchError
from quantbench.models import create_model
from quantbench.quantize import QuantConfig, layer_table, model_size_bits, quantize_, quantizer_parameters, regularization

SCHEDULES = ("cosine", "step")


def paper_lr(bits: int | None) -> float:
    """LSQ's initial learning rate: 0.1 full precision, 0.01 below 8 bits, 0.001 at 8 bits and above."""
    if bits is None:
        return 0.1
    return 0.001 if bits >= 8 else 0.01


def paper_weight_decay(bits: int | None) -> float:
    """LSQ's weight decay: 1e-4 at 4 bits and above (and full precision), 0.5e-4 at 3 bits, 0.25e-4 at 2 bits."""
    if bits is None or bits >= 4:
        return 1e-4
    return {3: 0.5e-4, 2: 0.25e-4}[bits]


@dataclass
class TrainConfig:
    dataset: str = "digits"
    model: str = "small_cnn"
    out: str = "runs/train"
    quantizer: str | None = None  # None: full precision
    bits: int | None = None
    first_last_bits: int | None = 8  # None: first and last layers stay full precision
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    weight_options: dict[str, Any] = field(default_factory=dict)
    activation_options: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a full-precision run directory or state_dict file
    epochs: int = 2
    batch_size: int = 128
    lr: float | None = None  # None: the paper's, by bits
    weight_decay: float | None = None  # None: the paper's, by bits
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine decay without restarts; "step": x0.1 at 1/3 and 2/3 of training
    quantizer_weight_decay: bool = False
    distill: bool = False
    distill_temperature: float = 1.0
    distill_weight: float = 0.5  # weight of the teacher term; 0.5 = the paper's equal weights
    seed: int = 0
    data_dir: str | None = None
    download: bool = False
    pretrained: bool | str = False
    device: str = "cpu"
    compile: bool = False  # torch.compile the whole (quantized) model
    threads: int | None = None  # torch CPU threads (None: torch's default)
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    max_train_batches: int | None = None  # a smoke-test cap on batches per epoch (recorded; never a default)

    def resolved(self) -> TrainConfig:
        """A copy with every default filled in and every value checked."""
        config = TrainConfig(**asdict(self))
        if (config.quantizer is None) != (config.bits is None):
            raise QuantbenchError("give --quantizer and --bits together (or neither, for full precision)")
        if config.quantizer is not None:
            quantizers.get(config.quantizer)
        if config.bits is not None and not quantizers.MIN_BITS <= config.bits <= quantizers.MAX_BITS:
            raise QuantbenchError(f"--bits {config.bits} is out of range: choose 2..16")
        if config.epochs < 1 or config.batch_size < 1:
            raise QuantbenchError("--epochs and --batch-size must be at least 1")
        if config.schedule not in SCHEDULES:
            raise QuantbenchError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
        if config.distill and not config.init_from:
            raise QuantbenchError("--distill needs --init-from: the full-precision teacher")
        config.lr = paper_lr(config.bits) if config.lr is None else config.lr
        config.weight_decay = paper_weight_decay(config.bits) if config.weight_decay is None else config.weight_decay
        return config


# ---- helpers ------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def write_json(path: Path, payload: Any) -> None:
    """Write atomically: a reader never sees a half-written file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def save_atomically(obj: Any, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def environment() -> dict[str, Any]:
    import torchvision

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "quantbench": __import__("quantbench").__version__,
        "git_commit": commit or "unknown",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def load_state_dict_file(source: str) -> dict[str, torch.Tensor]:
    """A state_dict from a run directory (its model.pt) or a file."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise QuantbenchError(f"--init-from {source}: no such checkpoint (give a run directory with model.pt, or a .pt file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample_batch(data: Any, batch_size: int) -> torch.Tensor:
    """The first test batch: decides each layer's activation sign in ``quantize_`` (test data: no augmentation)."""
    return next(iter(DataLoader(data.test, batch_size=batch_size)))[0]


def epoch_loader(data: Any, config: TrainConfig, epoch: int) -> DataLoader:
    """The training batches of one epoch, in an order that depends only on (seed, epoch), so a resumed run and
    every quantizer of a comparison see the same batches."""
    order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    return DataLoader(data.train, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=order,
                      num_workers=config.workers)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == labels).sum().item()
            correct5 += (top == labels[:, None]).any(dim=1).sum().item()
            total += labels.numel()
    return {"test_loss": loss_sum / total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def build_model(config: TrainConfig, data: Any, sample_input: torch.Tensor) -> tuple[nn.Module, nn.Module | None]:
    """The (possibly quantized) student and, when distilling, the full-precision teacher."""
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                         pretrained=config.pretrained)
    teacher = None
    state = load_state_dict_file(config.init_from) if config.init_from else None
    # A quantized checkpoint (progressive fine-tuning: QIL 5 -> 4 -> 3 -> 2 bits) carries its quantizers' learned
    # state, so it is loaded after quantization; a full-precision one before.
    quantized_state = state is not None and any("_quantizer." in key for key in state)
    if state is not None and not quantized_state:
        _load(model, state, config)
    if config.distill:
        if quantized_state:
            raise QuantbenchError("--distill needs a full-precision --init-from (the teacher)")
        teacher = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels)
        teacher.load_state_dict(state)
        teacher.eval().requires_grad_(False)
    if config.quantizer is not None:
        quant = QuantConfig(config.quantizer, config.bits, config.first_last_bits, config.quantizer_options,
                            config.weight_options, config.activation_options)
        quantize_(model, quant, sample_input)
    if quantized_state:
        _load(model, state, config)
    return model, teacher


def _load(model: nn.Module, state: dict[str, torch.Tensor], config: TrainConfig) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise QuantbenchError(
            f"--init-from {config.init_from} does not fit {config.model}: {str(error).splitlines()[0]} "
            "(it must be a checkpoint of the same model, dataset and quantizer family)"
        ) from None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    quantizer_ids = {id(p) for p in quantizer_parameters(model)}
    weights = [p for p in model.parameters() if id(p) not in quantizer_ids]
    groups = [{"params": weights, "weight_decay": config.weight_decay, "name": "weights"}]
    if quantizer_ids:
        groups.append({
            "params": quantizer_parameters(model),
            "weight_decay": config.weight_decay if config.quantizer_weight_decay else 0.0,
            "name": "quantizers",
        })
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Cosine decay without restarts (per iteration), or x0.1 at 1/3 and 2/3 of training."""
    progress = step / max(1, total_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (0.1 ** (int(progress >= 1 / 3) + int(progress >= 2 / 3)))


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy against the teacher's softened distribution (Hinton et al.; LSQ section 3.7 uses T = 1)."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    return -(soft_targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean() * temperature**2


# ---- the run ------------------------------------------------------------------------------------------------------


def new_progress(enabled: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not enabled)


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The config minus what only changes speed (threads, workers): a run may resume with other values of these."""
    return {key: value for key, value in config.items() if key not in ("threads", "workers")}


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None,
          progress: bool | Progress = True) -> dict[str, Any]:
    """Run (or resume) one training run; returns the final metrics (also in ``out/metrics.json``).

    ``progress`` is a flag or a live ``rich`` Progress to add this run's bars to (``compare`` shows one display).
    ``stop_after_epoch`` ends the call early after that epoch's checkpoint, as an interruption would (for tests).
    """
    config = config.resolved()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    if (out / "metrics.json").exists() and not resume:
        raise QuantbenchError(f"{out} already holds a finished run; pass --resume to reuse it or choose another --out")
    if resume and (out / "metrics.json").exists():
        _check_same_recipe(out, config)
        return json.loads((out / "metrics.json").read_text())
    with _run_lock(out):
        return _train(config, out, checkpoint_path, resume, stop_after_epoch, progress)


def _check_same_recipe(out: Path, config: TrainConfig) -> None:
    """A finished run is reused only for the config that made it: never a silent result for other settings."""
    saved = json.loads((out / "config.json").read_text())["train"] if (out / "config.json").exists() else None
    if saved is not None and _recipe(saved) != _recipe(asdict(config)):
        changed = sorted(k for k in _recipe(asdict(config)) if saved.get(k) != asdict(config)[k])
        raise QuantbenchError(
            f"{out} holds a finished run with different settings ({', '.join(changed)}); use another --out"
        )


@contextlib.contextmanager
def _run_lock(out: Path):
    """One process per run directory: a second one (e.g. two compare processes over one grid) fails clearly."""
    lock = out / ".lock"
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = lock.read_text().strip() or "?"
        if owner.isdigit() and not _alive(int(owner)):
            lock.unlink(missing_ok=True)  # left by a killed process
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        else:
            raise QuantbenchError(f"{out} is being trained by process {owner}; wait for it or use another --out") from None
    os.write(descriptor, str(os.getpid()).encode())
    os.close(descriptor)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _train(config: TrainConfig, out: Path, checkpoint_path: Path, resume: bool, stop_after_epoch: int | None,
           progress: bool | Progress) -> dict[str, Any]:
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    data = create_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
    test_loader = DataLoader(data.test, batch_size=256, shuffle=False, num_workers=config.workers)
    model, teacher = build_model(config, data, sample_batch(data, config.batch_size))
    model.to(device)
    teacher = teacher.to(device) if teacher is not None else None
    optimizer = make_optimizer(model, config)
    # The compiled wrapper shares parameters and state_dict keys (under _orig_mod.) with the model; checkpoints and
    # metrics use the plain model, the training and evaluation steps the compiled one.
    forward = model  # compiled after the first step (--compile): the quantizers' data-driven init runs eagerly
    steps_per_epoch = len(DataLoader(data.train, batch_size=config.batch_size, drop_last=True))
    if config.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, config.max_train_batches)
    total_steps = steps_per_epoch * config.epochs

    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0
    if resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if _recipe(checkpoint["config"]) != _recipe(asdict(config)):
            raise QuantbenchError(f"{out} holds a run with a different config; resume with the same options or use another --out")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        random.setstate(checkpoint["python_rng"])
        history, start_epoch, elapsed = checkpoint["history"], checkpoint["epoch"] + 1, checkpoint["elapsed"]
    else:
        write_json(out / "config.json", {"train": asdict(config), "dataset_source": data.source})
        write_json(out / "environment.json", environment())

    shared = isinstance(progress, Progress)
    bar = progress if shared else new_progress(bool(progress))
    with contextlib.nullcontext() if shared else bar:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            model.train()
            loader = epoch_loader(data, config, epoch)
            task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch, status="")
            loss_sum = correct = seen = 0.0
            for index, (images, labels) in enumerate(loader):
                if index >= steps_per_epoch:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(config, epoch * steps_per_epoch + index, total_steps)
                images, labels = images.to(device), labels.to(device)
                logits = forward(images)
                loss = F.cross_entropy(logits, labels)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    kd = distillation_loss(logits, teacher_logits, config.distill_temperature)
                    loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
                loss = loss + regularization(model).to(loss.device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if epoch == 0 and index == 0 and config.quantizer is not None:
                    # after the first forward (steps initialized, N known), before the first update
                    print_layer_table(write_layer_table(model, out), bar.console, bool(progress) and not shared)
                optimizer.step()
                if config.compile and forward is model:
                    forward = torch.compile(model)
                loss_sum += loss.item() * labels.numel()
                correct += (logits.argmax(1) == labels).sum().item()
                seen += labels.numel()
                bar.update(task, advance=1, status=f"loss {loss_sum / seen:.3f} acc {100 * correct / seen:.1f}%")
            metrics = evaluate(forward, test_loader, device)
            elapsed += time.perf_counter() - started
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
                            **metrics, "lr_end": optimizer.param_groups[0]["lr"], "elapsed_s": elapsed})
            bar.update(task, status=f"test top1 {metrics['top1']:.2f}%")
            if shared:
                bar.remove_task(task)
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "rng": torch.get_rng_state(), "python_rng": random.getstate(), "epoch": epoch,
                             "history": history, "elapsed": elapsed, "config": asdict(config)}, checkpoint_path)
            write_csv(out / "epochs.csv", history)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
                return {"interrupted_after_epoch": epoch + 1}

    if config.quantizer is None:
        write_layer_table(model, out)
    save_atomically(model.state_dict(), out / "model.pt")
    final = {**{key: history[-1][key] for key in ("top1", "top5", "test_loss")},
             "wall_time_s": elapsed, "model_size_bits": model_size_bits(model),
             "parameters": sum(p.numel() for p in model.parameters()), "epochs": config.epochs,
             "num_classes": data.num_classes}
    write_json(out / "metrics.json", final)  # last: its presence marks the run finished
    return final


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    temporary = path.with_suffix(".tmp")
    pd.DataFrame(rows).to_csv(temporary, index=False)
    os.replace(temporary, path)


def print_layer_table(rows: list[dict[str, Any]], console: Any, enabled: bool = True) -> None:
    from rich.table import Table

    if not enabled:
        return
    table = Table(title="layers", title_justify="left")
    columns = ["layer", "weight_bits", "activation_bits", "activation_signed", "quantizer", "weight_n", "activation_n",
               "weight_step", "activation_step"]
    for column in columns:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    console.print(table)


def write_layer_table(model: nn.Module, out: Path) -> list[dict[str, Any]]:
    rows = layer_table(model)
    write_csv(out / "layers.csv", rows)
    return rows
