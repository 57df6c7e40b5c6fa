"""``quantbench compare --launcher slurm|local``: a grid's cells as submitit jobs.

Each cell is a :class:`CellJob`, a ``submitit.helpers.Checkpointable`` that runs grid.py's cell command (``quantbench
train --config CELL.json --resume``; a torchrun job over the allocation's GPUs when a cell has several). On preemption
or timeout submitit calls ``checkpoint``, which stops the cell (its last finished epoch is in ``checkpoint.pt``) and
hands submitit the same call to requeue; the requeued job resumes from that epoch.

Slurm: the cells of each dependency wave that start from one parent (a baseline, or a QIL chain's previous stage) go
out as one array with ``--dependency=afterok:<the parent's job id>``, so a fine-tune starts once its own baseline is
done and a failed baseline holds back only its own seed. ``compare`` returns once everything is submitted; a rerun
submits only cells neither finished nor still in the queue (``sacct``, through submitit). Local (submitit's
LocalExecutor, no Slurm needed): the same jobs on this machine, wave by wave, ``--workers`` at a time, waited for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console

from quantbench.comparison import grid
from quantbench.comparison.compare import CompareConfig, PlannedRun, is_finished
from quantbench.errors import QuantbenchError

try:
    import submitit

    from quantbench.comparison.cell_job import CellJob
except ImportError:  # the launchers need it; the rest of quantbench does not
    submitit = None

#: Slurm job states in which a cell is still coming (a rerun must not submit it again)
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                       "REQUEUE_HOLD", "REQUEUE_FED", "UNKNOWN")
SLURM_FLAGS = {"partition": "--slurm-partition", "time": "--slurm-time", "gpus_per_node": "--gpus-per-node",
               "array_parallelism": "--slurm-array-parallelism", "options": "--slurm-option"}


def require_submitit() -> None:
    if submitit is None:
        raise QuantbenchError("--launcher local/slurm needs submitit: pip install quantbench[slurm]")


# ---- Slurm parameters ---------------------------------------------------------------------------------------------


def parse_minutes(value: Any) -> int:
    """``--slurm-time``: minutes (``240``) or Slurm's ``[D-]HH:MM[:SS]`` (``4:00:00``, ``1-12:00:00``) -> minutes."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", text)
    if text.isdigit():
        minutes = int(text)
    elif match:
        days, hours, mins, secs = (int(part or 0) for part in match.groups())
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    else:
        raise QuantbenchError(f"--slurm-time must be minutes or [D-]HH:MM[:SS], e.g. 240 or 4:00:00; got {value!r}")
    if minutes < 1:
        raise QuantbenchError(f"--slurm-time must be at least one minute, got {value!r}")
    return minutes


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``--slurm-option KEY=VALUE`` (repeatable) -> ``{KEY: VALUE}``."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise QuantbenchError(f"--slurm-option expects KEY=VALUE, e.g. qos=high or account=myproject; got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _number(value: str) -> Any:
    return int(value) if value.isdigit() else value


def slurm_parameters(config: CompareConfig) -> dict[str, Any]:
    """The ``SlurmExecutor.update_parameters`` every array of this grid gets (what would be submitted).

    ``--slurm-option`` keys that submitit knows (``qos``, ``account``, ``cpus_per_task``, ``mem_gb``, ...) become
    its parameters; any other key is passed to sbatch as ``--KEY=VALUE`` (submitit's ``additional_parameters``)."""
    settings = dict(config.slurm)
    unknown = sorted(set(settings) - set(SLURM_FLAGS))
    if unknown:
        raise QuantbenchError(f"unknown [slurm] setting(s) {', '.join(unknown)}; use {', '.join(SLURM_FLAGS)}")
    gpus = int(settings.get("gpus_per_node") or 0)
    parameters: dict[str, Any] = {
        "job_name": f"quantbench-{Path(config.out).name}",
        "time": parse_minutes(settings.get("time", 60)),
        "nodes": 1,
        "ntasks_per_node": 1,  # one launcher per cell; a multi-GPU cell is torchrun inside the allocation
        "array_parallelism": int(settings.get("array_parallelism") or 256),
        "stderr_to_stdout": True,
    }
    if settings.get("partition"):
        parameters["partition"] = settings["partition"]
    if gpus:
        parameters["gpus_per_node"] = gpus
    known = set(submitit.SlurmExecutor._valid_parameters()) if submitit is not None else set()
    extra: dict[str, Any] = {}
    for key, value in (settings.get("options") or {}).items():
        name = key.replace("-", "_")
        if name == "mem_gb":
            parameters["mem"] = f"{value}GB"
        elif name in known:
            parameters[name] = _number(str(value))
        else:
            extra[key.replace("_", "-")] = value
    if extra:
        parameters["additional_parameters"] = extra
    return parameters


def processes_per_cell(config: CompareConfig) -> int:
    """A cell's processes: ``--nproc-per-node``, else one per GPU of the allocation (``--gpus-per-node``)."""
    gpus = int(config.slurm.get("gpus_per_node") or 0) if config.launcher == "slurm" else 0
    return config.nproc_per_node if config.nproc_per_node > 1 else max(1, gpus)


def sbatch_script(config: CompareConfig, count: int, dependency: str | None = None) -> str:
    """The sbatch file submitit would write for an array of ``count`` cells (for tests and ``--dry-run`` users)."""
    require_submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    parameters = {**slurm_parameters(config), **({"dependency": dependency} if dependency else {})}
    return _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                               folder=Path(config.out) / "grid" / "slurm" / "%j", map_count=count, **parameters)


# ---- submission ---------------------------------------------------------------------------------------------------


def _job(config: CompareConfig, run: PlannedRun, threads: int | None, plugins: list[str] | None) -> CellJob:
    config_file = grid.write_cell_file(config.out, run, threads)
    return CellJob(str(config.out), run.name, str(config_file), processes_per_cell(config), list(plugins or []))


def queued_jobs(job_ids: list[str]) -> set[str]:
    """The job ids Slurm still holds (pending, running, requeued), from one ``sacct`` call through submitit's watcher.
    A job sacct cannot place (sacct missing or failing, a job too new) counts as held: never submit a cell twice."""
    watcher = submitit.SlurmJob.watcher
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    return {job_id for job_id in job_ids if watcher.get_state(job_id, mode="cache").upper() in ACTIVE_SLURM_STATES}


def submit_slurm(config: CompareConfig, runs: list[PlannedRun], plugins: list[str] | None,
                 console: Console, executor: Any = None) -> dict[str, str]:
    """Submit every cell neither finished nor queued; returns ``{cell: job id}`` of the new submissions."""
    require_submitit()
    out = Path(config.out)
    folder = out / "grid" / "slurm" / "%j"
    parameters = slurm_parameters(config)  # bad settings fail here, before anything is submitted
    if executor is None:
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError:
            raise QuantbenchError("--launcher slurm: no Slurm here (srun not found); run compare on a cluster's "
                                  "login node, or use --launcher local / --workers N on this machine") from None
    executor.update_parameters(**parameters)
    threads = int(parameters["cpus_per_task"]) if "cpus_per_task" in parameters else config.recipe.threads
    previous = {cell["name"]: cell for cell in grid.read_manifest(out).get("cells", [])}
    recorded = {name: str(cell["job_id"]) for name, cell in previous.items()
                if cell.get("launcher") == "slurm" and cell.get("job_id")}
    held = queued_jobs(list(recorded.values())) if recorded else set()
    job_of = {name: job for name, job in recorded.items() if job in held}  # cell -> the job it runs (or will run) as
    submitted: dict[str, str] = {}
    for wave in grid.waves(runs):
        groups: dict[str | None, list[PlannedRun]] = {}
        for run in wave:
            if not is_finished(run) and run.name not in job_of:
                groups.setdefault(grid.dependency(run, runs), []).append(run)
        for parent, group in groups.items():
            after = job_of.get(parent) if parent else None
            executor.update_parameters(dependency=f"afterok:{after}" if after else None)
            jobs = executor.submit_array([_job(config, run, threads, plugins) for run in group])
            for run, job in zip(group, jobs):
                job_of[run.name] = submitted[run.name] = str(job.job_id)
                grid.exit_path(out, run.name).unlink(missing_ok=True)
            console.print(f"submitted {len(group)} cell(s) as job {jobs[0].job_id.split('_')[0]}"
                          + (f" after {after}" if after else "") + f": {', '.join(run.name for run in group)}")
    updates = {name: {"launcher": "slurm", "job_id": job, "state": "queued", "error": None}
               for name, job in submitted.items()}
    grid.write_manifest(out, runs, "slurm", updates, slurm=parameters)
    if not submitted:
        console.print("nothing to submit: every cell is finished or still queued")
    return submitted


def run_local(config: CompareConfig, runs: list[PlannedRun], plugins: list[str] | None, console: Console) -> dict[str, str]:
    """Every unfinished cell through submitit's LocalExecutor, wave by wave, ``--workers`` at a time; waits.
    Returns ``{cell: error line}`` of the cells that failed."""
    from quantbench.comparison.workers import threads_per_cell

    require_submitit()
    out = Path(config.out)
    executor = submitit.LocalExecutor(folder=out / "grid" / "submitit" / "%j")
    executor.update_parameters(timeout_min=7 * 24 * 60)  # its default (2 min) would requeue every real cell
    parallel = config.cell_workers
    threads = threads_per_cell(config.recipe.threads, parallel)
    failed: dict[str, str] = {}
    states: dict[str, dict[str, Any]] = {}
    grid.write_manifest(out, runs, "local", {run.name: {"launcher": "local", "state": "pending", "job_id": None,
                                                       "error": None} for run in runs})
    for wave in grid.waves(runs):
        todo = []
        for run in wave:
            parent = grid.dependency(run, runs)
            if parent in failed:
                failed[run.name] = states.setdefault(run.name, {})["error"] = f"not started: {parent} failed"
                states[run.name]["state"] = "failed"
            elif not is_finished(run):
                todo.append(run)
        for start in range(0, len(todo), parallel):
            chunk = todo[start:start + parallel]
            jobs = executor.submit_array([_job(config, run, threads, plugins) for run in chunk])
            for run, job in zip(chunk, jobs):
                states[run.name] = {"launcher": "local", "state": "queued", "job_id": str(job.job_id), "error": None}
            grid.write_manifest(out, runs, "local", states)
            try:
                _wait_local(chunk, jobs, states, failed, out, console)
            except KeyboardInterrupt:  # submitit's local jobs outlive this process unless cancelled
                for job in jobs:
                    job.cancel()
                raise
            grid.write_manifest(out, runs, "local", states)
    return failed


def _wait_local(chunk: list[PlannedRun], jobs: list[Any], states: dict[str, dict[str, Any]], failed: dict[str, str],
                out: Path, console: Console) -> None:
    for run, job in zip(chunk, jobs):
        try:
            job.result()
            states[run.name]["state"] = "done"
            console.print(f"[green]✓[/] {run.name} (job {job.job_id})")
        except Exception:  # noqa: BLE001 - submitit wraps the cell's failure; its log has the error line
            failed[run.name] = states[run.name]["error"] = grid.last_log_line(out, run.name) or "failed"
            states[run.name]["state"] = "failed"
            console.print(f"[red]✗[/] {run.name} failed: {failed[run.name]}")


def run_submitit(config: CompareConfig, runs: list[PlannedRun], plugins: list[str] | None,
                 console: Console) -> dict[str, str]:
    """``--launcher local`` (runs and waits) or ``slurm`` (submits and returns the job ids)."""
    if config.launcher == "slurm":
        return submit_slurm(config, runs, plugins, console)
    return run_local(config, runs, plugins, console)
