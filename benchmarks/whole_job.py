"""What a whole training job costs beyond its arithmetic: ``quantbench train`` against the bare loop, and the quick
``quantbench compare``.

    python -m benchmarks.whole_job [--dataset fashion-mnist] [--model small_cnn] [--rounds 2] [--threads 2]
                                   [--pipelines memory,loader] [--precisions fp,lsq] [--compare]
                                   [--out reports/benchmarks]

1. **epoch**: one training epoch plus the test-set evaluation, for full precision and for lsq 2-bit (fine-tuned from
   the same full-precision weights), by

   * ``train[<pipeline>]``: ``quantbench.training.run.train`` exactly as ``quantbench train --epochs 1`` runs it
     (dataset built, model built and quantized, checkpoints, config, layer table, dynamics at the default interval,
     metrics), into a fresh directory each time, with ``--data-pipeline`` = each of ``--pipelines``;
   * ``bare``: the same model, optimizer (SGD, momentum, the paper's weight decay) and global batches, already
     normalized tensors in memory, one loop of forward / cross-entropy / backward / step, then the test set in
     batches of 256: no data pipeline, no logging, no files.

   Contenders run interleaved (order rotated each round) after ``--warmup`` untimed rounds; the table gives median wall seconds
   and the ratio to ``bare`` of the same precision.
2. **compare** (``--compare``): the wall time of the quick preset, ``quantbench compare --data-pipeline P --out DIR``
   in a subprocess (digits, the preset's quantizers, 2 seeds, 2 workers), once per pipeline, back to back.

Writes ``whole_job.csv`` and ``whole_job.md`` into ``--out`` when given.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from benchmarks.machine import cpu_model, interleaved, load_average, write_text_report
from quantbench.config import TrainConfig
from quantbench.data import create_dataset
from quantbench.qat import QuantConfig, quantize_
from quantbench.training.distributed import Context
from quantbench.training.loop import data_loaders, make_optimizer
from quantbench.training.run import build_model, sample_batch, train


def bare_runner(config: TrainConfig, data, batches: list[tuple[torch.Tensor, torch.Tensor]],
                test: list[tuple[torch.Tensor, torch.Tensor]]):
    """One epoch of the plain loop on tensors in memory, then the test set: the arithmetic the job cannot avoid."""

    def run() -> float:
        torch.manual_seed(config.seed)
        model, _ = build_model(config, data, sample_batch(data, config.batch_size))
        if config.quantizer is not None and config.init_from is None:
            quantize_(model, QuantConfig(config.quantizer, config.bits), batches[0][0])
        optimizer = make_optimizer(model, config)
        started = time.perf_counter()
        model.train()
        for images, labels in batches:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for images, _ in test:
                model(images)
        return time.perf_counter() - started

    return run


def train_runner(config: TrainConfig, root: Path):
    count = [0]

    def run() -> float:
        count[0] += 1
        run_config = replace(config, out=str(root / f"{Path(config.out).name}-{config.data_pipeline}-{count[0]}"))
        started = time.perf_counter()
        train(run_config, progress=False)
        return time.perf_counter() - started

    return run


def epoch_table(args: argparse.Namespace, root: Path) -> pd.DataFrame:
    base = TrainConfig(dataset=args.dataset, model=args.model, epochs=1, batch_size=args.batch_size, threads=args.threads,
                       seed=0, out=str(root / "fp"), data_pipeline="memory")
    print("training the full-precision weights the 2-bit runs start from (one epoch, untimed)", flush=True)
    train(base, progress=False)
    configs = {"fp": replace(base, out=str(root / "fp-run")),
               "lsq 2-bit": replace(base, quantizer="lsq", bits=2, init_from=str(root / "fp"), out=str(root / "q-run"))}
    configs = {label: config for label, config in configs.items() if label.split()[0] in args.precisions.split(",")}
    data = create_dataset(args.dataset)
    runners = {}
    for label, config in configs.items():
        loader, test = data_loaders(data, config, Context(), torch.device("cpu"))
        loader.sampler.set_epoch(0)
        batches = [(images.clone(), labels.clone()) for images, labels in loader]
        runners[f"{label}: bare"] = bare_runner(config, data, batches, [(i.clone(), l.clone()) for i, l in test])
        for pipeline in args.pipelines.split(","):
            runners[f"{label}: train[{pipeline}]"] = train_runner(replace(config, data_pipeline=pipeline), root)
    samples = interleaved(runners, args.rounds, warmup=args.warmup)
    rows = []
    for name, times in samples.items():
        label = name.split(":")[0]
        base_time = statistics.median(samples[f"{label}: bare"])
        rows.append({"contender": name, "rounds": len(times), "median_s": statistics.median(times),
                     "ratio_to_bare": statistics.median(times) / base_time})
    return pd.DataFrame(rows)


def compare_time(root: Path, pipeline: str) -> float:
    """Wall seconds of the quick preset, ``quantbench compare --data-pipeline PIPELINE``, in a fresh directory."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantbench", "compare", "--data-pipeline", pipeline,
                    "--out", str(root / f"quick-{pipeline}")], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the untimed full-precision "
                        "training at the start already warms the process up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipelines", default="memory,loader", help="train contenders' --data-pipeline values")
    parser.add_argument("--precisions", default="fp,lsq", help="which epochs to time: fp (full precision), lsq "
                        "(lsq 2-bit)")
    parser.add_argument("--compare", action="store_true", help="also time the quick quantbench compare")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="quantbench-whole-job-") as temporary:
        root = Path(temporary)
        frame = epoch_table(args, root)
        header = (f"{args.model} on {args.dataset}, batch {args.batch_size}, {args.threads} threads, {cpu_model()}, "
                  f"torch {torch.__version__}, load {load_average()}")
        lines = [header, "", frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
        if args.compare:  # back to back: the DataLoader path (before the in-memory pipeline) and each other
            lines += [""] + [f"quick `quantbench compare --data-pipeline {pipeline}` (digits preset, 2 workers): "
                             f"{compare_time(root, pipeline):.1f} s wall" for pipeline in args.pipelines.split(",")]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text_report(args.out, "whole_job", frame, text, "benchmarks.whole_job", argv)
    return frame


if __name__ == "__main__":
    main()
