"""One cell of a comparison as a G-process data-parallel job, through torch's own launcher (``torch.distributed.run``,
what ``torchrun`` is): the cell's resolved config goes to ``quantbench train --config`` in each process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantbench.config import TrainConfig
from quantbench.errors import QuantbenchError
from quantbench.utils.io import write_json, read_json


def torchrun_command(config_file: Path, nproc_per_node: int, log_dir: Path) -> list[str]:
    """The launcher command for one cell on this machine (a standalone rendezvous on a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            f"--log-dir={log_dir}", "--redirects=3", "-m", "quantbench", "train", "--config", str(config_file),
            "--resume"]


def train_distributed(config: TrainConfig, nproc_per_node: int) -> dict[str, Any]:
    """Train (or resume) ``config`` as an ``nproc_per_node``-process job and return its metrics.

    The launcher's own output and each rank's stdout/stderr go to ``OUT/launch/`` (the comparison's display stays
    readable); a failed job ends in one line naming the rank-0 log.
    """
    out = Path(config.out)
    launch_dir = out / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    config_file = launch_dir / "config.json"
    write_json(config_file, {"train": asdict(config)})
    log = launch_dir / "torchrun.log"
    with log.open("w") as stream:
        result = subprocess.run(torchrun_command(config_file, nproc_per_node, launch_dir / "logs"),
                                stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not (out / "metrics.json").is_file():
        raise QuantbenchError(f"{out.name}: the {nproc_per_node}-process job failed (exit {result.returncode}): "
                              f"{_last_error(launch_dir)}; logs in {launch_dir}")
    return read_json(out / "metrics.json", f"delete {out} to retrain that cell")


def _last_error(launch_dir: Path) -> str:
    """The last non-empty line of a rank's stderr (rank 0 first), else of the launcher's log."""
    candidates = sorted(launch_dir.glob("logs/**/stderr.log")) + [launch_dir / "torchrun.log"]
    for path in candidates:
        try:
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1][:300]
    return "no output"
