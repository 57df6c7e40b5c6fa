"""The grid manifest ``DIR/grid.json`` and the files every launcher shares, so ``compare``, ``status``, ``report`` and a
rerun agree on what the grid is and where each cell stands.

A cell is one planned run (:class:`quantbench.comparison.compare.PlannedRun`). Out-of-process launchers (``--workers``,
``--launcher local|slurm``) train it from the same file, ``DIR/grid/cells/NAME.json``, as ``quantbench train --config
FILE --resume`` does (a torchrun job when a cell has several processes), its output in ``DIR/grid/logs/NAME.log``
and its exit status in ``DIR/grid/logs/NAME.exit``.

``grid.json`` is written only by the process that schedules or submits (atomically), never by a cell: cells on
different Slurm nodes would race on it. What a cell does is read from its own files instead, so :func:`cell_state`
combines both: a ``metrics.json`` (done) beats a held run lock (running) beats a non-zero exit file (failed) beats
the manifest's record of a submission (queued).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantbench.utils.io import process_alive, write_json

if TYPE_CHECKING:
    from quantbench.comparison.compare import PlannedRun

MANIFEST = "grid.json"
#: states a cell can be in, as ``status`` shows them
STATES = ("done", "running", "queued", "failed", "pending")
#: settings that change only speed: a finished run is reused whatever they were (as quantbench.training.run does)
SPEED_ONLY = ("threads", "workers")


def settings_hash(run: PlannedRun) -> str:
    """A short hash of the cell's recipe: two cells with one hash train the same thing. Speed-only settings are left
    out, and so are the paths (``out``, ``init_from``: where the grid lives), so a grid moved or rerun under another
    directory, or the same cell of another grid, has the same hash; the dependency is recorded as ``depends_on``."""
    recipe = {key: value for key, value in asdict(run.config).items()
              if key not in SPEED_ONLY and key not in ("out", "init_from")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dependency(run: PlannedRun, runs: list[PlannedRun]) -> str | None:
    """The cell this one fine-tunes from (its ``init_from`` is that cell's directory), if it is in the grid."""
    if not run.config.init_from:
        return None
    source = Path(run.config.init_from).resolve()
    return next((other.name for other in runs if other.directory.resolve() == source), None)


def waves(runs: list[PlannedRun]) -> list[list[PlannedRun]]:
    """The grid in dependency order: baselines, then cells that start from a baseline, then from those (QIL chains)."""
    depth: dict[str, int] = {}
    by_name = {run.name: run for run in runs}

    def depth_of(run: PlannedRun) -> int:
        if run.name not in depth:
            parent = dependency(run, runs)
            depth[run.name] = 0 if parent is None else depth_of(by_name[parent]) + 1
        return depth[run.name]

    result: list[list[PlannedRun]] = []
    for run in runs:
        level = depth_of(run)
        result.extend([] for _ in range(level + 1 - len(result)))
        result[level].append(run)
    return result


# ---- the files of one cell ----------------------------------------------------------------------------------------


def cells_dir(out: str | Path) -> Path:
    return Path(out) / "grid" / "cells"


def log_path(out: str | Path, name: str) -> Path:
    return Path(out) / "grid" / "logs" / f"{name}.log"


def exit_path(out: str | Path, name: str) -> Path:
    return Path(out) / "grid" / "logs" / f"{name}.exit"


def write_cell_file(out: str | Path, run: PlannedRun, threads: int | None) -> Path:
    """The cell's resolved train config (what ``quantbench train --config`` reads), with its thread count."""
    config = {**asdict(run.config), "threads": threads if threads is not None else run.config.threads}
    return write_json(cells_dir(out) / f"{run.name}.json", {"train": config})


def cell_command(config_file: Path, nproc_per_node: int = 1) -> list[str]:
    """The one command every out-of-process launcher runs for a cell (resumes from the last epoch checkpoint)."""
    if nproc_per_node > 1:
        from quantbench.comparison.launch import torchrun_command

        return torchrun_command(config_file, nproc_per_node, config_file.parent.parent / "torchrun" / config_file.stem)
    return [sys.executable, "-m", "quantbench", "train", "--config", str(config_file), "--resume"]


def cell_environment(plugins: list[str] | None) -> dict[str, str]:
    """This environment plus the ``--plugin`` modules as ``QUANTBENCH_PLUGINS`` (files made absolute), so a cell's
    process can build a plugin quantizer; unbuffered output so its log is current."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    specs = [str(Path(p).resolve()) if p.endswith(".py") or Path(p).is_file() else p for p in plugins or []]
    existing = [part for part in env.get("QUANTBENCH_PLUGINS", "").split(",") if part.strip()]
    if specs:
        env["QUANTBENCH_PLUGINS"] = ",".join(dict.fromkeys(existing + specs))
    return env


def last_log_line(out: str | Path, name: str) -> str:
    """The last non-empty line of the cell's log (a failure's error line), or ''."""
    try:
        lines = log_path(out, name).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip()[:300] for line in reversed(lines) if line.strip()), "")


def lock_owner(directory: Path) -> int | None:
    """The pid holding the run directory's lock (quantbench.training.run), if that process is alive here."""
    try:
        owner = int((directory / ".lock").read_text().strip())
    except (OSError, ValueError):
        return None
    return owner if process_alive(owner) else None




# ---- the manifest -------------------------------------------------------------------------------------------------


def write_manifest(out: str | Path, runs: list[PlannedRun], launcher: str,
                   cells: dict[str, dict[str, Any]] | None = None, **fields: Any) -> Path:
    """Write ``DIR/grid.json``: every cell with its settings hash, dependency, launcher, job id and recorded state.

    ``cells`` holds per-cell updates (``job_id``, ``state``, ``error``); a cell without one keeps what the previous
    manifest said about it if its settings are unchanged (e.g. a Slurm job id a rerun must not resubmit)."""
    out = Path(out)
    previous = {cell["name"]: cell for cell in read_manifest(out).get("cells", [])}
    rows = []
    for run in runs:
        digest = settings_hash(run)
        kept = previous.get(run.name, {}) if previous.get(run.name, {}).get("settings_hash") == digest else {}
        row = {"name": run.name, "directory": str(run.directory), "settings_hash": digest,
               "depends_on": dependency(run, runs), "intermediate": bool(run.row.get("intermediate")),
               "launcher": kept.get("launcher", launcher), "job_id": kept.get("job_id"),
               "state": kept.get("state", "pending"), "error": kept.get("error")}
        row.update((cells or {}).get(run.name, {}))
        rows.append(row)
    return write_json(out / MANIFEST, {"launcher": launcher, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "scheduler_pid": os.getpid(), **fields, "cells": rows})


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest, or ``{}`` for a directory without one (a grid trained before grid.json existed)."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # absent, or torn by a crash: the next compare rewrites it from the cells' own files
    valid = isinstance(manifest, dict) and isinstance(manifest.get("cells", []), list) and all(
        isinstance(cell, dict) and "name" in cell and "directory" in cell for cell in manifest.get("cells", []))
    return manifest if valid else {}  # JSON, but not a manifest: treated as none, rewritten by the next compare


def cell_state(out: str | Path, cell: dict[str, Any], manifest: dict[str, Any],
               held: set[str] | None = None) -> tuple[str, str]:
    """``(state, detail)`` of one manifest cell from what its files show now (see the module doc). ``held``: the
    Slurm job ids still in the queue, when known (``sacct``); a Slurm cell whose job left it unfinished failed."""
    directory = Path(cell["directory"])
    if (directory / "metrics.json").is_file():
        return "done", ""
    remote = cell.get("launcher") == "slurm"
    if lock_owner(directory) is not None or (remote and (directory / ".lock").exists()):
        return "running", last_log_line(out, cell["name"])
    exit_file = exit_path(out, cell["name"])  # an in-process (inline) grid writes none: one left is from before
    if cell.get("launcher") != "inline" and exit_file.is_file() and exit_file.read_text().strip() not in ("", "0"):
        return "failed", cell.get("error") or last_log_line(out, cell["name"]) or f"exit {exit_file.read_text().strip()}"
    if cell.get("state") == "failed":
        return "failed", cell.get("error") or ""
    if cell.get("state") in ("queued", "running"):
        # Slurm keeps a queued job whoever submitted it; a local job or worker pool only while its process lives.
        job = str(cell.get("job_id") or "")
        owner = job if cell.get("launcher") == "local" else str(manifest.get("scheduler_pid") or "")
        if remote and held is not None and job not in held:
            return "failed", f"job {job} left the queue unfinished: {last_log_line(out, cell['name']) or 'no log'}"
        if remote or (owner.isdigit() and process_alive(int(owner))):
            return "queued", f"job {job}" if job else ""
    return "pending", ""


def grid_states(out: str | Path, held: set[str] | None = None) -> list[tuple[dict[str, Any], str, str]]:
    """Every manifest cell with its current state and detail, in grid order."""
    manifest = read_manifest(out)
    return [(cell, *cell_state(out, cell, manifest, held)) for cell in manifest.get("cells", [])]


def failed_cells(out: str | Path) -> list[tuple[str, str]]:
    """``(name, error line)`` of every failed cell (what ``compare`` reports at its end and ``report`` lists)."""
    return [(cell["name"], detail) for cell, state, detail in grid_states(out) if state == "failed"]


def slurm_settings(file_values: dict[str, Any] | None, partition: str | None, time_limit: str | None,
                   gpus_per_node: int | None, array_parallelism: int | None, options: dict[str, str] | None
                   ) -> dict[str, Any] | None:
    """The ``[slurm]`` table of a config file with the command line's ``--slurm-*`` flags over it, key by key."""
    flags = {"partition": partition, "time": time_limit, "gpus_per_node": gpus_per_node,
             "array_parallelism": array_parallelism}
    merged = {**((file_values or {}).get("slurm") or {}), **{k: v for k, v in flags.items() if v is not None}}
    if options:
        merged["options"] = {**(merged.get("options") or {}), **options}
    return merged or None
