"""``quantbench compare``: every quantizer under one recipe, over seeds, bits and option sweeps, resumable.

The grid: for each seed a full-precision baseline (``DIR/fp/seed<S>``), then for each (quantizer, bits, seed, option
combination) a fine-tune from that seed's baseline (``DIR/runs/<name>``) with the same recipe, data order and seed,
so that only the quantizer differs. Each run is a ``quantbench train`` run directory; a run is finished when its
``metrics.json`` exists, so re-running the same command skips finished runs, resumes interrupted ones from their
last checkpoint, and ``DIR/results.csv`` is rebuilt (atomically) from the finished runs only.

Configuration, lowest to highest precedence: the quick digits preset, ``--config FILE.toml``, command-line flags.
Any ``TrainConfig`` field can be set in the file; sweeps are lists: ``lr``, ``weight_decay``, ``schedule`` and
quantizer options ``set = {"lsq.grad_scale" = ["full", "numel"]}`` (``--set lsq.grad_scale=full,numel``).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import quantizers
from quantbench.config import TRAIN_FIELDS, TrainConfig, check_bits, fp_or_bits, merge
from quantbench.errors import QuantbenchError
from quantbench.comparison.grid import write_manifest
from quantbench.comparison.launch import train_distributed
from quantbench.training.run import train
from quantbench.utils.io import write_csv, write_json, read_json

#: train-level options that may be given as lists (one run per value)
TRAIN_SWEEPS = ("lr", "weight_decay", "schedule", "bn", "oscillation_dampen", "oscillation_freeze")
QIL_PROGRESSIVE_BITS = (5, 4, 3, 2)  # the QIL paper's progressive fine-tuning chain, starting from full precision
LAUNCHERS = ("workers", "local", "slurm")
#: how a grid is run, not what it computes: changing these between runs of one grid is expected
LAUNCH_KEYS = ("cell_workers", "launcher", "slurm")

#: the quick preset: bundled digits data, every built-in quantizer, two seeds, well under 3 minutes on 2 cores
QUICK_PRESET: dict[str, Any] = {
    "dataset": "digits",
    "model": "small_cnn",
    "quantizers": ["lsq", "qil", "pact", "fixed"],
    "bits": [2, 3, 4, 8],
    "seeds": [0, 1],
    "fp_epochs": 4,
    "epochs": 1,
    "batch_size": 64,
}
#: ``quantbench compare`` without --config or --workers: 2 worker processes (README: 2.3x faster on 2 cores).
#: Not part of QUICK_PRESET, which every config file and library call builds on: those stay in one process.
QUICK_PRESET_WORKERS = 2


@dataclass
class CompareConfig:
    """A comparison grid: the shared training recipe plus the axes that vary."""

    recipe: TrainConfig
    quantizers: list[str]
    bits: list[int]
    seeds: list[int]
    fp_epochs: int
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # "lr" / "weight_decay" / "schedule" / "NAME.KEY"
    qil_progressive: bool = False
    out: str = "runs/compare"
    fp_lr: float | None = None  # None: the paper's full-precision LR
    epochs_by_bits: dict[int, int] = field(default_factory=dict)  # e.g. {8: 1}: the paper trains 8-bit for 1 epoch
    fp_from: str | None = None  # reuse the full-precision baselines of another comparison directory
    nproc_per_node: int = 1  # > 1: each run is a data-parallel job of that many processes (torch.distributed.run)
    cell_workers: int = 1  # compare --workers: cells at once on this machine, each its own process (workers.py)
    launcher: str = "workers"  # workers (this machine), local or slurm (submitit, quantbench.comparison.submit)
    slurm: dict[str, Any] = field(default_factory=dict)  # partition, time, gpus_per_node, array_parallelism, options

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recipe": asdict(self.recipe)}


@dataclass
class PlannedRun:
    name: str
    directory: Path
    config: TrainConfig
    row: dict[str, Any]  # quantizer, bits, seed, variant, swept values


# ---- configuration ----------------------------------------------------------------------------------------------


def build_config(file_values: dict[str, Any] | None = None, flags: dict[str, Any] | None = None) -> CompareConfig:
    """Merge the quick preset, a config file and command-line flags (``None`` flags are not given)."""
    merged = merge(QUICK_PRESET, file_values, flags)
    sweep: dict[str, list[Any]] = dict(merged.pop("set", {}))
    train_fields = TRAIN_FIELDS
    grid_keys = {"quantizers", "bits", "seeds", "fp_epochs", "qil_progressive", "out", "fp_lr", "epochs_by_bits",
                 "fp_from", "nproc_per_node", *LAUNCH_KEYS}
    unknown = sorted(set(merged) - train_fields - grid_keys)
    if unknown:
        raise QuantbenchError(
            f"unknown compare option(s) {', '.join(unknown)}; use any train option "
            f"({', '.join(sorted(train_fields))}) or {', '.join(sorted(grid_keys))}"
        )
    for key in TRAIN_SWEEPS:
        value = merged.pop(key, None)
        if isinstance(value, list):
            sweep[key] = value
        elif value is not None:
            merged[key] = value
    if "first_last_bits" in merged:
        merged["first_last_bits"] = fp_or_bits(merged["first_last_bits"])
    recipe_values = {k: v for k, v in merged.items() if k in train_fields and k not in ("quantizer", "bits")}
    config = CompareConfig(
        recipe=TrainConfig(**recipe_values),
        quantizers=_quantizer_names(merged["quantizers"]),
        bits=_integers(merged["bits"], "bits"),
        seeds=_integers(merged["seeds"], "seeds"),
        fp_epochs=_integers(merged["fp_epochs"], "fp_epochs")[0],
        sweep=sweep,
        qil_progressive=bool(merged.get("qil_progressive", False)),
        out=str(merged.get("out", "runs/compare")),
        fp_lr=merged.get("fp_lr"),
        fp_from=merged.get("fp_from"),
        epochs_by_bits={int(bits): int(epochs) for bits, epochs in (merged.get("epochs_by_bits") or {}).items()},
        nproc_per_node=merged.get("nproc_per_node", 1),
        cell_workers=merged.get("cell_workers", 1), launcher=merged.get("launcher", "workers"),
        slurm=dict(merged.get("slurm") or {}),
    )
    validate(config)
    return config


def _integers(value: Any, key: str) -> list[int]:
    """A list of whole numbers (a TOML list, one number, or the CLI's "2,3"), or the one-line error; 2.5 and "two"
    are refused, not truncated."""
    numbers = []
    for item in _as_list(value):
        if isinstance(item, str) and item.strip().lstrip("-").isdigit():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise QuantbenchError(f"{key} must be whole numbers, e.g. {key} = [2, 3]; got {item!r}")
        numbers.append(item)
    return numbers


def _quantizer_names(value: Any) -> list[str]:
    """The grid's quantizers; ``all`` means every registered one (built-ins and loaded plugins)."""
    names = _as_list(value)
    return quantizers.available() if names == ["all"] else names


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def validate(config: CompareConfig) -> None:
    for name in config.quantizers:
        quantizers.get(name)  # unknown names fail with the list of available ones
    for bits in config.bits:
        check_bits(bits)
    if not config.seeds or not config.quantizers or not config.bits:
        raise QuantbenchError("--quantizers, --bits and --seeds each need at least one value")
    for key in ("quantizers", "bits", "seeds"):
        values = getattr(config, key)
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise QuantbenchError(f"--{key} lists {', '.join(repeated)} more than once; each {key[:-1]} once (a repeated "
                                  "seed would count one run twice in every interval)")
    for key, values in config.sweep.items():
        if not values:
            raise QuantbenchError(f"{key} = [] sweeps nothing: give at least one value")
    if isinstance(config.nproc_per_node, bool) or not isinstance(config.nproc_per_node, int) or config.nproc_per_node < 1:
        raise QuantbenchError(f"--nproc-per-node must be an integer of at least 1, got {config.nproc_per_node!r}")
    if isinstance(config.cell_workers, bool) or not isinstance(config.cell_workers, int) or config.cell_workers < 1:
        raise QuantbenchError(f"--workers must be an integer of at least 1, got {config.cell_workers!r}")
    if config.launcher not in LAUNCHERS:
        raise QuantbenchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {config.launcher!r}")
    for key in config.sweep:
        name, dot, option = key.partition(".")
        if key in TRAIN_SWEEPS:
            continue
        if not dot or not option:
            raise QuantbenchError(f"sweep key {key!r}: use NAME.KEY for quantizer options or one of {', '.join(TRAIN_SWEEPS)}")
        if name not in config.quantizers:
            raise QuantbenchError(f"--set {key}: quantizer '{name}' is not in --quantizers ({', '.join(config.quantizers)})")
        options = quantizers.options_of(name)
        if option not in options:
            raise QuantbenchError(f"--set {key}: '{name}' has no option '{option}'; its options: {', '.join(options)}")


# ---- planning -----------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", text)


def variants_for(config: CompareConfig, quantizer: str) -> list[dict[str, Any]]:
    """Every combination of this quantizer's swept options and the train-level sweeps."""
    keys = [k for k in config.sweep if k in TRAIN_SWEEPS or k.split(".", 1)[0] == quantizer]
    return [dict(zip(keys, values)) for values in itertools.product(*(config.sweep[k] for k in keys))]


def variant_label(variant: dict[str, Any]) -> str:
    return " ".join(f"{key.split('.', 1)[-1]}={value}" for key, value in variant.items())


def plan(config: CompareConfig) -> list[PlannedRun]:
    """The full grid in run order: baselines first, then each quantizer's runs (a QIL chain in chain order)."""
    out = Path(config.out)
    runs: list[PlannedRun] = []
    fp_root = Path(config.fp_from) if config.fp_from else out
    for seed in config.seeds:
        fp_config = TrainConfig(**{**asdict(config.recipe), "out": str(fp_root / "fp" / f"seed{seed}"), "seed": seed,
                                   "epochs": config.fp_epochs, "lr": config.fp_lr, "weight_decay": None,
                                   "quantizer_options": {}, "oscillation_dampen": 0.0, "oscillation_freeze": 0.0})
        runs.append(PlannedRun(f"fp-seed{seed}", fp_root / "fp" / f"seed{seed}", fp_config,
                               {"quantizer": "fp", "bits": 32, "seed": seed, "variant": ""}))
    for quantizer, seed in itertools.product(config.quantizers, config.seeds):
        for variant in variants_for(config, quantizer):
            options = {k.split(".", 1)[1]: v for k, v in variant.items() if "." in k}
            train_values = {k: v for k, v in variant.items() if k in TRAIN_SWEEPS}
            label = variant_label(variant)
            suffix = f"-{_slug(label.replace(' ', ','))}" if label else ""
            fp_dir = fp_root / "fp" / f"seed{seed}"
            chain = _bits_in_order(config, quantizer)
            previous: dict[int, Path] = {}
            for bits in chain:
                name = f"{quantizer}-{bits}bit-seed{seed}{suffix}"
                directory = out / "runs" / name
                init_from = fp_dir
                if config.qil_progressive and quantizer == "qil" and bits in QIL_PROGRESSIVE_BITS and bits != 5:
                    init_from = previous[bits + 1]
                previous[bits] = directory
                run_config = TrainConfig(**{
                    **asdict(config.recipe), **train_values, "out": str(directory), "seed": seed,
                    "quantizer": quantizer, "bits": bits, "init_from": str(init_from),
                    "quantizer_options": {**config.recipe.quantizer_options, **options},
                    "epochs": config.epochs_by_bits.get(bits, config.recipe.epochs),
                })
                quantizers.create(quantizer, bits=bits, signed=True, **run_config.quantizer_options)  # bad options fail now
                row = {"quantizer": quantizer, "bits": bits, "seed": seed, "variant": label, **variant}
                if bits in config.bits:
                    runs.append(PlannedRun(name, directory, run_config, row))
                else:
                    runs.append(PlannedRun(name, directory, run_config, {**row, "intermediate": True}))
    return runs


def _without_launch(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in LAUNCH_KEYS}


def _bits_in_order(config: CompareConfig, quantizer: str) -> list[int]:
    if not (config.qil_progressive and quantizer == "qil"):
        return list(config.bits)
    lowest = min((b for b in config.bits if b in QIL_PROGRESSIVE_BITS), default=None)
    chain = [b for b in QIL_PROGRESSIVE_BITS if lowest is not None and b >= lowest]
    return chain + [b for b in config.bits if b not in chain]


# ---- running ------------------------------------------------------------------------------------------------------


def is_finished(run: PlannedRun) -> bool:
    return (run.directory / "metrics.json").is_file()


def _classifier_width(directory: Path) -> int | None:
    """Runs finished before metrics.json recorded num_classes: the last layer's output width in layers.csv."""
    try:
        last = pd.read_csv(directory / "layers.csv").iloc[-1]
        return int(str(last["weight_shape"]).split("x")[0])
    except (OSError, ValueError, KeyError, IndexError, pd.errors.EmptyDataError):
        return None


def collect_results(config: CompareConfig, runs: list[PlannedRun] | None = None) -> pd.DataFrame:
    """One row per finished run of the grid (intermediate chain stages excluded), written to DIR/results.csv."""
    rows = []
    for run in runs if runs is not None else plan(config):
        if run.row.get("intermediate") or not is_finished(run):
            continue
        metrics = read_json(run.directory / "metrics.json", f"delete {run.directory} to retrain that cell")
        rows.append({"run": run.name, **run.row, **{k: metrics.get(k) for k in
                     ("top1", "top5", "test_loss", "model_size_bits", "wall_time_s", "epochs")},
                     "num_classes": metrics.get("num_classes") or _classifier_width(run.directory)})
    frame = pd.DataFrame(rows)
    write_csv(Path(config.out) / "results.csv", frame)
    return frame


def run_compare(config: CompareConfig, command: str | None = None, progress: bool = True,
                console: Console | None = None, plugins: list[str] | None = None) -> pd.DataFrame:
    """Run (or continue) the whole grid; returns the results table (``--launcher slurm``: once submitted, the runs
    finished so far). ``plugins``: ``--plugin`` modules the cells' own processes import."""
    console = console or Console()
    if config.fp_from and not (Path(config.fp_from) / "fp").is_dir():  # checked before anything is created
        raise QuantbenchError(f"--fp-from {config.fp_from}: no full-precision baselines there (no fp/ folder); give "
                              "a compare directory whose baselines finished, or leave --fp-from out to train them")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(config)
    saved = out / "compare.json"
    if saved.exists():
        previous = read_json(saved, f"delete {saved} (the cells are kept) and rerun")
        current = json.loads(json.dumps(config.to_dict(), default=str))
        if _without_launch(previous.get("config") or {}) != _without_launch(current):
            console.print(f"[yellow]note[/]: {out} was started with a different configuration; finished runs whose "
                          "directories match are reused, the rest are trained")
    command = command or " ".join(["quantbench", *map(shlex.quote, sys.argv[1:])])
    history = previous.get("history", []) if saved.exists() else []
    history.append({"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "pending_runs": sum(not is_finished(run) for run in runs)})
    write_json(saved, {"config": config.to_dict(), "command": command, "history": history,
                       "runs": [run.name for run in runs]})
    pending = [run for run in runs if not is_finished(run)]
    console.print(f"{len(runs)} runs in the grid: {len(runs) - len(pending)} finished, {len(pending)} to train -> {out}")
    if config.launcher != "workers" or config.cell_workers > 1:  # each cell in its own process: grid.py's command
        if config.launcher == "workers":
            from quantbench.comparison.workers import run_workers

            run_workers(config, runs, config.cell_workers, plugins, console, progress)
        else:
            from quantbench.comparison.submit import run_submitit  # needs submitit: quantbench[slurm]

            run_submitit(config, runs, plugins, console)
        return collect_results(config, runs)
    write_manifest(out, runs, "inline", {run.name: {"launcher": "inline", "state": "queued", "job_id": None,
                                                    "error": None} for run in pending})
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, disable=not progress)
    with bar:
        grid = bar.add_task("grid", total=len(runs), completed=len(runs) - len(pending), status="")
        for run in pending:
            bar.update(grid, status=run.name)
            started = time.perf_counter()
            if config.nproc_per_node > 1:
                metrics = train_distributed(run.config, config.nproc_per_node)
            else:
                if run.config.compile:
                    # Each run compiles a new model: without a reset the cache fills after a few runs and later
                    # runs silently go eager, so their wall times would not be comparable.
                    import torch._dynamo

                    torch._dynamo.reset()
                metrics = train(run.config, resume=True, progress=bar)
            bar.update(grid, advance=1, status=f"{run.name}: top1 {metrics['top1']:.2f}% "
                                               f"({time.perf_counter() - started:.0f} s)")
            collect_results(config, runs)
    return collect_results(config, runs)
