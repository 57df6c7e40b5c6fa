"""One worker process of ``compare --workers N`` (``python -m quantbench.comparison.cell_worker``).

It imports torch and quantbench once, then trains the cells the pool sends it, one after another, in this process:
starting a fresh interpreter per cell costs 5-25 s on 2 cores (imports), which is more than a quick-preset cell trains.
Protocol: one JSON line per cell on stdin (``{"name", "config", "log", "nproc"}``), one JSON line back on the
original stdout (``{"name", "ok", "error"}``); while a cell trains, file descriptors 1 and 2 point at its log, so
everything it prints (torch's C++ warnings too) lands there. A cell's exception fails that cell only; Ctrl-C
(KeyboardInterrupt) ends the worker, leaving the run directory resumable as an interrupted ``train`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator


@contextlib.contextmanager
def _output_to(path: str) -> Iterator[None]:
    """File descriptors 1 and 2 (and sys.stdout/stderr) into ``path`` for the duration, then back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def train_cell(config_file: str, nproc_per_node: int) -> None:
    """Train (or resume) one cell as ``quantbench train --config CONFIG --resume`` would."""
    from quantbench.config import TrainConfig, load_config_file
    from quantbench.training.run import train

    config = TrainConfig.from_layers(load_config_file(config_file))
    if nproc_per_node > 1:
        from quantbench.comparison.launch import train_distributed

        metrics = train_distributed(config, nproc_per_node)
    else:
        if config.compile:
            import torch._dynamo

            torch._dynamo.reset()  # as run_compare does: a full compile cache would leave later cells eager
        metrics = train(config, resume=True, progress=False)
    print(f"top1 {metrics['top1']:.2f}%  top5 {metrics['top5']:.2f}%  {metrics['wall_time_s']:.1f} s  -> {config.out}")


def main() -> None:
    import quantizers

    replies = os.fdopen(os.dup(1), "w", buffering=1)  # the pool's channel, kept apart from what cells print
    quantizers.load_plugins([])  # QUANTBENCH_PLUGINS from the pool: plugin quantizers exist before any config
    for line in sys.stdin:
        request = json.loads(line)
        reply = {"name": request["name"], "ok": True, "error": ""}
        with _output_to(request["log"]):
            try:
                train_cell(request["config"], int(request.get("nproc", 1)))
            except Exception as error:  # noqa: BLE001 - any failure fails this cell alone; the log has the traceback
                traceback.print_exc()
                reply.update(ok=False, error=f"{type(error).__name__}: {error}".splitlines()[0][:300])
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
