"""What recording training dynamics costs: training steps with and without ``dynamics.csv`` recording, interleaved.

    python -m benchmarks.dynamics [--model small_cnn] [--dataset digits] [--every 1,10,50] [--rounds 8] [--threads N]

Each contender trains the same quantized model (``--quantizer`` at ``--bits``, first/last 8 bits, as ``quantbench
train``) on the same fixed batches through the real loop (``train_one_epoch``): ``off`` without a callback, ``every=N``
with the run's callback (oscillation tracking every step, a recording every N steps, rows buffered as in a run) and
``freeze`` / ``dampen`` with a remedy on at every=N for the largest N, and ``off (again)``, a second model without
dynamics built last (the A/A pair: how far two identical contenders differ, the floor under every ratio). A round runs ``steps`` steps of every
contender (a multiple of each N, so every round holds the same number of recordings), the order rotated each round;
the table gives the median seconds per step over rounds and the ratio to ``off``. The default clock is this
process's CPU time on one thread, so other processes on a shared machine do not enter the measurement. Nothing is written to a run
directory (rows stay in memory). Writes ``--out/dynamics.csv`` and ``--out/dynamics.md`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.machine import interleaved, load_average
from quantbench.config import TrainConfig
from quantbench.data import create_dataset
from quantbench.models import create_model
from quantbench.qat import QuantConfig, quantize_
from quantbench.training.dynamics import Dynamics
from quantbench.training.loop import Trainer, make_optimizer, train_one_epoch
from quantbench.training.oscillation import OscillationTracker


def build(args: argparse.Namespace, batches: list[tuple[torch.Tensor, torch.Tensor]], every: int | None,
          freeze: float = 0.0, dampen: float = 0.0):
    """A trainer and its callback (None for ``off``), the model initialized by one untimed step."""
    torch.manual_seed(0)
    data = create_dataset(args.dataset)
    model = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels)
    quantize_(model, QuantConfig(args.quantizer, args.bits), batches[0][0])
    config = TrainConfig(dataset=args.dataset, model=args.model, quantizer=args.quantizer, bits=args.bits,
                         epochs=1_000_000, batch_size=args.batch_size, oscillation_freeze=freeze,
                         oscillation_dampen=dampen)
    trainer = Trainer(model, make_optimizer(model, config), config, torch.device("cpu"), len(batches))
    callback = None
    if every is not None:
        tracker = OscillationTracker(model, freeze=freeze, dampen=dampen, total_steps=10**9)
        dynamics = Dynamics(model, Path(tempfile.mkdtemp()), every, len(batches), 10**9, tracker)
        dynamics.optimizer = trainer.optimizer
        tracker.attach(trainer.optimizer)
        if dampen:
            trainer.extra_loss = dynamics.extra_loss
        callback = dynamics.on_step
    train_one_epoch(trainer, batches, 0, on_step=callback)  # initializes quantizers and tracking state
    return trainer, callback


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--quantizer", default="lsq")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--every", default="1,10,50", help="recording intervals to time, comma separated")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is this thread's work)")
    parser.add_argument("--clock", choices=("process", "wall"), default="process",
                        help="process: CPU time of this process (other processes' load does not count); wall")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    intervals = [int(part) for part in args.every.split(",") if part.strip()]
    steps = math.lcm(*intervals)
    data = create_dataset(args.dataset)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    batches = [batch for batch, _ in zip(loader, range(steps))]
    while len(batches) < steps:
        batches += batches[: steps - len(batches)]
    contenders = {"off": build(args, batches, None)}
    contenders.update({f"every={n}": build(args, batches, n) for n in intervals})

    contenders[f"freeze, every={intervals[-1]}"] = build(args, batches, intervals[-1], freeze=0.02)
    contenders[f"dampen, every={intervals[-1]}"] = build(args, batches, intervals[-1], dampen=1e-4)
    # the A/A pair: a second model without dynamics, built last. Identical contenders still differ (where their
    # tensors sit in memory, cache and allocator state); their ratio is the floor under the others.
    contenders["off (again)"] = build(args, batches, None)
    epochs = {name: 1 for name in contenders}

    def runner(name: str):
        trainer, callback = contenders[name]

        def run() -> float:
            started = clock()
            train_one_epoch(trainer, batches, epochs[name], on_step=callback)
            epochs[name] += 1
            return (clock() - started) / steps

        return run

    samples = interleaved({name: runner(name) for name in contenders}, args.rounds, args.warmup)
    base = statistics.median(samples["off"])
    rows = [{"contender": name, "steps_per_round": steps, "rounds": len(times),
             "median_s_per_step": statistics.median(times), "ratio_to_off": statistics.median(times) / base}
            for name, times in samples.items()]
    frame = pd.DataFrame(rows)
    header = (f"{args.model} on {args.dataset}, {args.quantizer} {args.bits}-bit, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads, {args.clock} clock, load {load_average()}")
    table = frame.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else frame.to_string(index=False)
    print(header)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out / "dynamics.csv", index=False)
        (out / "dynamics.md").write_text(f"{header}\n\n{table}\n")
    return frame


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


if __name__ == "__main__":
    main()
