"""One grid cell as a submitit job (``--launcher slurm|local``). Kept apart from submit.py and light to import: every
job's Python process unpickles this class before the cell's own ``quantbench train`` process starts."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from quantbench.comparison import grid

STOP_GRACE_S = 60  # within submitit's signal delay (90 s): time for a preempted cell to leave its run directory


class CellJob(Checkpointable):
    """One cell as a submitit job: run the cell command, record its exit status, fail with the log's last line."""

    def __init__(self, out: str, name: str, config_file: str, nproc_per_node: int, plugins: list[str]) -> None:
        self.out, self.name, self.config_file = out, name, config_file
        self.nproc_per_node, self.plugins = nproc_per_node, plugins
        self._process: subprocess.Popen | None = None

    def __call__(self) -> str:
        log = grid.log_path(self.out, self.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        grid.exit_path(self.out, self.name).unlink(missing_ok=True)
        with log.open("a") as stream:
            self._process = subprocess.Popen(grid.cell_command(Path(self.config_file), self.nproc_per_node),
                                             stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=grid.cell_environment(self.plugins))
            code = self._process.wait()
        grid.exit_path(self.out, self.name).write_text(f"{code}\n")
        if code != 0:
            raise RuntimeError(f"{self.name} failed (exit {code}): {grid.last_log_line(self.out, self.name)}")
        return self.name

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Preempted or timed out: stop the cell (it keeps its last epoch checkpoint), requeue the same call."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
        return DelayedSubmission(CellJob(self.out, self.name, self.config_file, self.nproc_per_node, self.plugins))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}  # a process handle does not pickle (nor survive a requeue)
