"""``quantbench compare --workers N``: N cells of a grid at once on this machine, each worker its own process.

Each of the N workers is a long-lived subprocess (``python -m quantbench.comparison.cell_worker``) that imports
torch once and trains the cells it is sent one after another, exactly as ``quantbench train --config
DIR/grid/cells/NAME.json --resume`` would (the file the cluster launchers use too). Not a process per cell: the
interpreter start (5-25 s on 2 cores) costs more than a quick-preset cell trains (measured in the README). Not a
``multiprocessing``/``concurrent.futures`` pool either: a worker killed by the kernel (out of memory) breaks a
``ProcessPoolExecutor`` for every cell and hangs a ``multiprocessing.Pool``, Ctrl-C in their workers is hard to make
clean, and they cannot hand a cell out the moment its baseline finishes. Here a dead worker fails its one cell and
is replaced, and each cell's output goes to its own log.

Scheduling is the least a dependency order needs: a cell starts when a worker is free and the run it fine-tunes from
(``init_from``: its baseline, or the previous stage of a QIL chain) is finished; a failed cell fails the cells that
depend on it and no other. The run directories' own locks keep two schedulers (or a leftover process) off one cell.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from quantbench.comparison import grid
from quantbench.comparison.compare import CompareConfig, PlannedRun, is_finished
from quantbench.errors import QuantbenchError
from quantbench.utils.io import read_json

POLL_S = 0.25
STOP_GRACE_S = 20.0  # how long Ctrl-C waits for a cell to leave its run directory cleanly before killing it


def threads_per_cell(threads: int | None, workers: int) -> int:
    """``--threads`` as given (per cell), else this machine's cores shared evenly between the workers."""
    return threads if threads else max(1, (os.cpu_count() or 1) // workers)


@dataclass
class Cell:
    run: PlannedRun
    parent: str | None
    state: str = "queued"  # queued -> running -> done | failed
    error: str = ""
    worker: Worker | None = None
    task: TaskID | None = None
    started: float = 0.0


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies (Linux), so a killed ``compare`` leaves no cell training."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_DEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: a cell outlives a killed parent; its run lock keeps a rerun off it until it ends


class Worker:
    """One long-lived worker process; a reader thread turns its reply lines into ``replies`` queue items."""

    def __init__(self, index: int, env: dict[str, str], log: Path, replies: queue.Queue) -> None:
        self.index, self.cell = index, None
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as stream:  # the worker's own output outside any cell (e.g. a crash)
            self.process = subprocess.Popen([sys.executable, "-m", "quantbench.comparison.cell_worker"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stream, env=env,
                                            text=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        threading.Thread(target=self._read, args=(replies,), daemon=True).start()

    def _read(self, replies: queue.Queue) -> None:
        for line in self.process.stdout:
            replies.put((self, json.loads(line)))
        replies.put((self, None))  # the process ended

    def send(self, cell: Cell, config_file: Path, log: Path, nproc: int) -> None:
        self.cell = cell
        self.process.stdin.write(json.dumps({"name": cell.run.name, "config": str(config_file), "log": str(log),
                                             "nproc": nproc}) + "\n")
        self.process.stdin.flush()

    def alive(self) -> bool:
        return self.process.poll() is None


class Pool:
    """The worker pool over one grid (see the module doc)."""

    def __init__(self, config: CompareConfig, runs: list[PlannedRun], workers: int, plugins: list[str] | None,
                 console: Console, progress: bool) -> None:
        self.config, self.runs, self.size, self.console = config, runs, workers, console
        self.out = Path(config.out)
        self.threads = threads_per_cell(config.recipe.threads, workers)
        self.env = grid.cell_environment(plugins)
        self.cells = {run.name: Cell(run, grid.dependency(run, runs), "done" if is_finished(run) else "queued")
                      for run in runs}
        self.workers: list[Worker] = []
        self.replies: queue.Queue = queue.Queue()
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, disable=not progress)
        self.grid_task = self.bar.add_task("grid", total=len(runs), completed=self._count("done"), status="")

    def _count(self, state: str) -> int:
        return sum(cell.state == state for cell in self.cells.values())

    def _save(self) -> None:
        updates = {name: {"state": cell.state, "error": cell.error or None, "launcher": "workers",
                          "job_id": f"worker {cell.worker.index} (pid {cell.worker.process.pid})" if cell.worker else None}
                   for name, cell in self.cells.items()}
        grid.write_manifest(self.out, self.runs, "workers", updates, workers=self.size, threads_per_cell=self.threads)

    def run(self) -> dict[str, str]:
        """Train every unfinished cell; returns ``{name: error line}`` of the cells that failed."""
        self._save()
        with self.bar:
            try:
                while any(cell.state in ("queued", "running") for cell in self.cells.values()):
                    if self._start() | self._reap():
                        self._save()
                    self._show()
            except KeyboardInterrupt:
                self._stop()
                raise
            finally:
                self._close()
                self._save()
        return {name: cell.error for name, cell in self.cells.items() if cell.state == "failed"}

    def _ready(self, cell: Cell) -> bool:
        parent = self.cells.get(cell.parent) if cell.parent else None
        if parent is not None and parent.state == "failed":
            cell.state, cell.error = "failed", f"not started: {parent.run.name} (its init_from) failed"
            self.console.print(f"[red]✗[/] {cell.run.name}: {cell.error}")
            self.bar.advance(self.grid_task)
            return False
        return (parent is None or parent.state == "done") and grid.lock_owner(cell.run.directory) is None

    def _idle_worker(self) -> Worker | None:
        self.workers = [worker for worker in self.workers if worker.alive() or worker.cell is not None]
        idle = next((worker for worker in self.workers if worker.cell is None and worker.alive()), None)
        if idle is None and len(self.workers) < self.size:
            used = {worker.index for worker in self.workers}
            index = next(i for i in range(self.size) if i not in used)
            idle = Worker(index, self.env, self.out / "grid" / "logs" / f"worker-{index}.log", self.replies)
            self.workers.append(idle)
        return idle

    def _start(self) -> bool:
        changed = False
        for cell in self.cells.values():
            if cell.state != "queued" or not self._ready(cell):
                changed |= cell.state == "failed"
                continue
            if is_finished(cell.run):  # finished by another process while this one waited
                cell.state, changed = "done", True
                self.bar.advance(self.grid_task)
                continue
            worker = self._idle_worker()
            if worker is None:
                break
            log = grid.log_path(self.out, cell.run.name)
            log.parent.mkdir(parents=True, exist_ok=True)
            grid.exit_path(self.out, cell.run.name).unlink(missing_ok=True)
            with log.open("a") as stream:
                stream.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: worker {worker.index}, "
                             f"quantbench train --config {grid.write_cell_file(self.out, cell.run, self.threads)} --resume\n")
            worker.send(cell, grid.cells_dir(self.out) / f"{cell.run.name}.json", log, self.config.nproc_per_node)
            cell.state, cell.worker, cell.started, changed = "running", worker, time.perf_counter(), True
            cell.task = self.bar.add_task(cell.run.name, total=cell.run.config.epochs, status="starting")
        return changed

    def _reap(self) -> bool:
        """Wait briefly for replies: a finished cell, or a worker that ended (its cell fails, the worker is replaced)."""
        try:
            worker, reply = self.replies.get(timeout=POLL_S)
        except queue.Empty:
            return False
        cell = worker.cell
        if cell is None:
            return False
        worker.cell = None
        if reply is None:  # the worker process died mid-cell (killed, out of memory, a crash in C++)
            code = worker.process.wait()
            reply = {"ok": False, "error": grid.last_log_line(self.out, cell.run.name) or f"worker exited ({code})"}
        seconds = time.perf_counter() - cell.started
        ok = bool(reply["ok"]) and is_finished(cell.run)
        grid.exit_path(self.out, cell.run.name).write_text("0\n" if ok else "1\n")
        if ok:
            cell.state = "done"
            self.console.print(f"[green]✓[/] {cell.run.name}: top1 {_top1(cell.run)} ({seconds:.0f} s)")
        else:
            cell.state, cell.error = "failed", reply["error"] or "failed"
            self.console.print(f"[red]✗[/] {cell.run.name} failed: {cell.error}")
        if cell.task is not None:
            self.bar.remove_task(cell.task)
            cell.task = None
        self.bar.advance(self.grid_task)
        return True

    def _show(self) -> None:
        counts = {state: self._count(state) for state in ("done", "running", "failed", "queued")}
        self.bar.update(self.grid_task, status=" · ".join(f"{n} {state}" for state, n in counts.items()))
        for cell in self.cells.values():
            if cell.task is not None:
                epochs = _epochs_done(cell.run.directory)
                self.bar.update(cell.task, completed=epochs, status=f"epoch {min(epochs + 1, cell.run.config.epochs)}"
                                                                    f"/{cell.run.config.epochs}")

    def _stop(self) -> None:
        """Ctrl-C: each worker gets SIGINT (the terminal may have sent it already) and time to release its run
        directory; what remains after the grace period is killed. Finished epochs stay in checkpoint.pt."""
        for worker in self.workers:
            if worker.alive():
                worker.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        for cell in self.cells.values():
            if cell.state == "running":
                cell.state = "queued"  # not failed: a rerun continues it
                grid.exit_path(self.out, cell.run.name).unlink(missing_ok=True)

    def _close(self) -> None:
        """End the idle workers: closing stdin ends their loop."""
        for worker in self.workers:
            if worker.alive() and worker.process.stdin and not worker.process.stdin.closed:
                worker.process.stdin.close()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                worker.process.kill()


def _epochs_done(directory: Path) -> int:
    try:
        return max(0, len((directory / "epochs.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def _top1(run: PlannedRun) -> str:
    try:
        metrics = read_json(run.directory / "metrics.json", f"delete {run.directory} to retrain that cell")
        return f"{metrics['top1']:.2f}%"
    except (OSError, ValueError, KeyError):
        return "?"


def run_workers(config: CompareConfig, runs: list[PlannedRun], workers: int, plugins: list[str] | None = None,
                console: Console | None = None, progress: bool = True) -> dict[str, str]:
    """Train the grid's unfinished cells ``workers`` at a time; returns ``{cell: error line}`` of failed cells."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise QuantbenchError(f"--workers must be an integer of at least 1, got {workers!r}")
    return Pool(config, runs, workers, plugins, console or Console(), progress).run()
