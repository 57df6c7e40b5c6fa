"""One training run: full-precision training, or quantized fine-tuning from a full-precision checkpoint.

``train(TrainConfig(...))`` writes one directory per run:

    config.json       the resolved config: every default filled in, quantizer conventions included
    layers.csv        the layer table (layer, bits, quantizer, activation sign, N for the gradient scale, steps)
    epochs.csv        per-epoch metrics
    metrics.json      final top1, top5 (percent), wall_time_s, model_size_bits, num_classes (written last, atomically)
    environment.json  package versions, git commit, machine
    checkpoint.pt     model, optimizer, schedule and RNG state after the latest epoch (for --resume)
    model.pt          the final weights (a state_dict; what --init-from reads)

The recipe's defaults are in :class:`quantbench.config.TrainConfig`, the loop in :mod:`quantbench.training.loop`; this
module owns the run directory: one process per directory (a lock), resume from the last checkpoint, atomic files, and a
finished run reused only for the settings that made it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from quantbench.config import TrainConfig
from quantbench.data import create_dataset
from quantbench.data.memory import MemoryLoader, pipeline_for
from quantbench.errors import QuantbenchError
from quantbench.models import create_model
from quantbench.qat import QuantConfig, layer_table, model_size_bits, plan_from_layer_table, quantize_
from quantbench.qat_bnfold import apply_bn_mode, set_bn_frozen
from quantbench.training import distributed, dynamics as run_dynamics, quantizer_hooks
from quantbench.training.distributed import Context, launched_context
from quantbench.training.environment import environment, numerics, resolve_amp
from quantbench.training.loop import Trainer, data_loaders, evaluate, make_optimizer, seed_everything, train_one_epoch
from quantbench.utils.io import process_alive, save_torch, write_csv, write_json, read_json

def load_state_dict_file(source: str) -> dict[str, torch.Tensor]:
    """A state_dict from a run directory (its model.pt) or a file."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise QuantbenchError(f"--init-from {source}: no such checkpoint (give a run directory with model.pt, or a .pt file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise QuantbenchError(f"--init-from {source}: {path} is not a PyTorch checkpoint ({type(error).__name__}); "
                              "give a run directory with model.pt or a state_dict saved with torch.save") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise QuantbenchError(f"--init-from {source}: {path} holds no state_dict (a dict of tensors); give a run "
                              "directory with model.pt or a state_dict saved with torch.save")
    return state


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample_batch(data: Any, batch_size: int) -> torch.Tensor:
    """The first test batch: decides each layer's activation sign in ``quantize_`` (test data: no augmentation)."""
    return next(iter(DataLoader(data.test, batch_size=batch_size)))[0]


def build_model(config: TrainConfig, data: Any, sample_input: torch.Tensor | None,
                layer_table: list[dict[str, Any]] | None = None) -> tuple[nn.Module, nn.Module | None]:
    """The (possibly quantized) student and, when distilling, the full-precision teacher.

    Layers are quantized as ``layer_table`` (a run's recorded ``layers.csv``) says when it is given, otherwise by
    the policy of :func:`quantbench.qat.quantize_` on ``sample_input``."""
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
        quantize_(model, quant, sample_input, plan=plan_from_layer_table(layer_table) if layer_table else None)
    apply_bn_mode(model, config)  # --bn fold: conv-BN pairs folded before weight quantization (quantbench.qat_bnfold)
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


def new_progress(enabled: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not enabled)


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The config minus what only changes speed (threads, workers): a run may resume with other values of these.

    An option a saved config lacks was added to quantbench after the run, which ran with its default; ``auto`` and
    the device it picks are the same setting."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    recipe = {key: value for key, value in {**defaults, **config}.items()
              if key not in ("threads", "workers", "dynamics_every", "tensorboard",  # speed, recording only
                             "data_pipeline")}  # the same batches either way; only augmentation draws differ
    recipe["device"] = resolve_device(recipe["device"]).type
    return recipe


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None,
          progress: bool | Progress = True) -> dict[str, Any]:
    """Run (or resume) one training run; returns the final metrics (also in ``out/metrics.json``).

    ``progress`` is a flag or a live ``rich`` Progress to add this run's bars to (``compare`` shows one display).
    ``stop_after_epoch`` ends the call early after that epoch's checkpoint, as an interruption would (for tests).
    """
    config = config.with_paper_defaults()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    if (out / "metrics.json").exists() and not resume:
        raise QuantbenchError(f"{out} already holds a finished run; pass --resume to reuse it or choose another --out")
    if resume and (out / "metrics.json").exists():
        _check_same_recipe(out, config)
        return read_json(out / "metrics.json", f"delete it to retrain {out}, or restore it")
    context = launched_context()
    device = distributed.rank_device(resolve_device(config.device), context)
    owns_process_group = distributed.start(context, device)
    try:
        with _run_lock(out) if context.is_main else contextlib.nullcontext():
            return _train(config, out, checkpoint_path, resume, stop_after_epoch, progress, context, device)
    finally:
        if owns_process_group:
            distributed.stop()


def _check_same_recipe(out: Path, config: TrainConfig) -> None:
    """A finished run is reused only for the config that made it: never a silent result for other settings."""
    saved = read_json(out / "config.json", f"delete {out} (or restore the file) and train again")["train"] if (out / "config.json").exists() else None
    if saved is not None and _recipe(saved) != _recipe(asdict(config)):
        changed = sorted(k for k, value in _recipe(asdict(config)).items() if _recipe(saved).get(k) != value)
        raise QuantbenchError(
            f"{out} holds a finished run with different settings ({', '.join(changed)}); use another --out"
        )


@contextlib.contextmanager
def _run_lock(out: Path):
    """One process per run directory: a second one (e.g. two compare processes over one grid) fails clearly.

    The lock file appears with its owner's pid already in it (written beside it, then hard-linked into place), so a
    process killed at any moment never leaves an anonymous lock; a lock whose owner is dead is taken over."""
    lock = out / ".lock"
    claim = out / f".lock.{os.getpid()}"
    claim.write_text(str(os.getpid()))
    try:
        try:
            os.link(claim, lock)
        except FileExistsError:
            owner = lock.read_text().strip() or "?"
            if owner.isdigit() and not _alive(int(owner)):
                lock.unlink(missing_ok=True)  # left by a killed process
                os.link(claim, lock)
            else:
                raise QuantbenchError(f"{out} is being trained by process {owner}; wait for it or use another --out") from None
    finally:
        claim.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """A lock owner that still runs; this process's own pid means a lock it left behind earlier (taken over)."""
    return process_alive(pid) and pid != os.getpid()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint to resume from; a corrupt or foreign file fails with one line and is never deleted here."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict) or not {"model", "optimizer", "epoch", "config"} <= set(checkpoint):
            raise ValueError("not a quantbench training checkpoint")
    except Exception as error:  # noqa: BLE001 - truncated file, wrong format: the same advice
        raise QuantbenchError(
            f"--resume: {path} is corrupt or not a quantbench checkpoint ({type(error).__name__}); delete it to "
            "restart this run from scratch, or rerun without --resume into another --out"
        ) from None
    return checkpoint


def _train(config: TrainConfig, out: Path, checkpoint_path: Path, resume: bool, stop_after_epoch: int | None,
           progress: bool | Progress, context: Context, device: torch.device) -> dict[str, Any]:
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    amp = resolve_amp(config.amp, device)
    if config.quantizer is not None and device.type == "cuda":
        # TF32 rounds a conv's inputs to 10 mantissa bits: quantized weights and activations would leave their grid.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    main = context.is_main
    data = create_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
    checkpoint = _read_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    requested = config.data_pipeline
    if checkpoint is not None and requested == "auto":  # a resumed run keeps the pipeline it started with (a run
        requested = checkpoint["config"].get("data_pipeline", "loader")  # from before the memory one: loader)
    config = replace(config, data_pipeline=pipeline_for(data, requested))  # recorded as the one that ran
    loader, test_loader = data_loaders(data, config, context, device)
    steps_per_epoch = len(loader)
    if config.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, config.max_train_batches)
    model, teacher = build_model(config, data, sample_batch(data, config.batch_size))
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)

    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0
    if checkpoint is not None:
        if _recipe(checkpoint["config"]) != _recipe(asdict(config)):
            raise QuantbenchError(f"{out} holds a run with a different config; resume with the same options or use another --out")
        model.load_state_dict(checkpoint["model"])
        history, start_epoch, elapsed = checkpoint["history"], checkpoint["epoch"] + 1, checkpoint["elapsed"]
    elif config.quantizer is not None:
        # Quantizers initialize from the first global batch on every rank, before DDP: identical state by
        # construction (see quantbench.training.distributed), and what a 1-process run's first step would do.
        first = (loader.global_batch(epoch=0) if isinstance(loader, MemoryLoader)
                 else distributed.first_global_batch(data.train, config.batch_size, config.seed, epoch=0))
        distributed.initialize_quantizers(model, first.to(device))
    if config.sync_bn and context.is_distributed:
        model = distributed.sync_batchnorm(model, device)
    distributed.broadcast_state(model, context)
    agree_at_start = distributed.ranks_agree(model, context)
    # With --compile the loop compiles the model after its first (eager) step; checkpoints and metrics use the plain
    # model, which shares parameters with the compiled (and the DDP) one.
    trainer = Trainer(model, make_optimizer(model, config), config, device, steps_per_epoch,
                      teacher=teacher.to(device) if teacher is not None else None,
                      forward=distributed.wrap(model, context, device), amp=amp,
                      scaler=torch.amp.GradScaler(device.type) if amp == "fp16" else None)
    if checkpoint is not None:
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        if trainer.scaler is not None and checkpoint.get("scaler"):
            trainer.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        random.setstate(checkpoint["python_rng"])
    elif main:
        write_json(out / "config.json", {"train": asdict(config), "dataset_source": data.source,
                                         "world_size": context.world_size, "amp": amp,
                                         "quantizer_hooks": quantizer_hooks.describe(model)})
        write_json(out / "environment.json", {**environment(), **numerics(device, amp, context)})

    dynamics = run_dynamics.for_run(model, config, out, trainer, main, start_epoch,
                                    checkpoint.get("dynamics") if checkpoint is not None else None)
    shared = isinstance(progress, Progress)
    bar = progress if shared else new_progress(bool(progress) and main)

    def first_step_layer_table(step: int, *_: Any) -> None:
        if step == 0 and config.quantizer is not None and main:  # steps initialized and N known, before the update
            print_layer_table(write_layer_table(model, out), bar.console, bool(progress) and not shared)
        if dynamics is not None:
            dynamics.on_step(step, *_)

    with contextlib.nullcontext() if shared else bar:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch, status="")
            status = lambda done, loss, top1: bar.update(task, completed=done, status=f"loss {loss:.3f} acc {top1:.1f}%")  # noqa: E731
            loader.sampler.set_epoch(epoch)
            set_bn_frozen(model, config, epoch)  # --bn fold: BN statistics frozen from --freeze-bn-epoch on
            train_metrics = train_one_epoch(trainer, loader, epoch, on_step=first_step_layer_table, progress=status)
            if main:  # rank 0 alone evaluates the full test set, once
                metrics = evaluate(model if context.is_distributed else trainer.forward, test_loader, device)
            elapsed += time.perf_counter() - started
            if main:
                history.append({"epoch": epoch + 1, **train_metrics, **metrics,
                                "lr_end": trainer.optimizer.param_groups[0]["lr"], "elapsed_s": elapsed})
                bar.update(task, status=f"test top1 {metrics['top1']:.2f}%")
                if dynamics is not None:  # rows first: a resume drops rows newer than its checkpoint
                    dynamics.end_epoch(history[-1], (epoch + 1) * steps_per_epoch)
                save_torch({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
                            "rng": torch.get_rng_state(), "python_rng": random.getstate(),
                            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                            "epoch": epoch, "history": history, "elapsed": elapsed, "config": asdict(config),
                            "dynamics": dynamics.state_dict() if dynamics is not None else None},
                           checkpoint_path)
                write_csv(out / "epochs.csv", history)
            if shared:
                bar.remove_task(task)
            distributed.barrier(context)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
                return {"interrupted_after_epoch": epoch + 1}

    if dynamics is not None:
        dynamics.close()
    # A quantizer that updates state outside autograd from its own rank's data would drift apart: say so.
    agree = agree_at_start and distributed.ranks_agree(model, context)
    if not agree and main:
        warnings.warn(f"{out}: quantizer state differs across the {context.world_size} ranks at the end of training "
                      "(rank 0's is saved); a quantizer updates state from its own rank's data", RuntimeWarning)
    final = {}
    if main:
        if config.quantizer is None:
            write_layer_table(model, out)
        save_torch(model.state_dict(), out / "model.pt")
        final = {**{key: history[-1][key] for key in ("top1", "top5", "test_loss")},
                 "wall_time_s": elapsed, "model_size_bits": model_size_bits(model),
                 "parameters": sum(p.numel() for p in model.parameters()), "epochs": config.epochs,
                 "num_classes": data.num_classes, "world_size": context.world_size,
                 "quantizer_state_identical_across_ranks": agree}
        write_json(out / "metrics.json", final)  # last: its presence marks the run finished
    return distributed.from_main(final, context)


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
