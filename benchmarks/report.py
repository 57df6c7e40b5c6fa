"""The quantizer benchmark's report: the issue's targets checked on a run, and ``results.md`` with its tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.machine import load_average
from benchmarks.settings import BITS, NOISY_SPREAD, TRAIN_BITS


def markdown_table(frame: pd.DataFrame, floats: str = "{:.2f}") -> str:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if isinstance(value, float):
                cells.append("n/a" if math.isnan(value) else floats.format(value))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance(ops: pd.DataFrame, saved: pd.DataFrame, train: pd.DataFrame | None) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, checked on this run: (target, measured, met)."""
    checks: list[tuple[str, str, bool | None]] = []

    def op(numel: int, bits: int, contender: str) -> float | None:
        rows = ops[(ops.numel == numel) & (ops.bits == bits) & (ops.contender == contender) & (ops["size"] != "activation")]
        return float(rows.median_ms.iloc[0]) if len(rows) else None

    for numel, label, limit in ((1 << 24, "2^24", 1.3), (1 << 22, "2^22", 1.5)):
        for bits in BITS:
            lsq, relu, ao = op(numel, bits, "lsq"), op(numel, bits, "relu"), op(numel, bits, "torch.ao fused")
            if None in (lsq, relu, ao):
                continue
            checks.append((f"lsq fwd+bwd <= {limit}x relu at {label}, {bits}-bit", f"{lsq / relu:.2f}x", lsq / relu <= limit))
            checks.append((f"lsq >= 5x faster than torch.ao at {label}, {bits}-bit", f"{ao / lsq:.1f}x", ao / lsq >= 5))
    lsq_saved = saved[(saved.contender == "lsq") & (saved.role == "activation (unsigned)")]
    if len(lsq_saved):
        count = int(lsq_saved.input_sized_saved.iloc[0])
        checks.append(("lsq saves at most one input-sized tensor", f"{count} (the input)" if bool(lsq_saved.input_saved.iloc[0]) else str(count), count <= 1))
    if train is not None and len(train):
        def ratio(quantizer: str, mode: str) -> float | None:
            rows = train[(train.quantizer == quantizer) & (train["mode"] == mode)]
            return float(rows.vs_fp_same_mode.iloc[0]) if len(rows) else None

        value = ratio("lsq", "eager")
        if value is not None:
            checks.append(("ResNet-20 step, lsq eager <= 1.2x fp eager", f"{value:.3f}x", value <= 1.2))
        value = ratio("lsq", "compiled")
        if value is not None:
            checks.append(("ResNet-20 step, lsq compiled <= 1.05x fp compiled", f"{value:.3f}x", value <= 1.05))
        for quantizer in ("fixed", "pact", "qil"):
            for mode in ("eager", "compiled"):
                value = ratio(quantizer, mode)
                if value is not None:
                    checks.append((f"ResNet-20 step, {quantizer} {mode} <= 1.3x fp {mode}", f"{value:.3f}x", value <= 1.3))
    return checks


def write_report(out: Path, machine: dict[str, Any], ops: pd.DataFrame, saved: pd.DataFrame,
                 train: pd.DataFrame | None, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ops.to_csv(out / "ops.csv", index=False)
    saved.to_csv(out / "saved.csv", index=False)
    if train is not None:
        train.to_csv(out / "train.csv", index=False)
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")

    lines = ["# Quantizer benchmark" + (" (--quick smoke run: sizes and rounds too small to mean anything)" if quick else ""), ""]
    lines += [f"- command: `{machine['command']}`"]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in machine.items() if key != "command"]
    lines += ["", "Ratios are of medians over interleaved rounds in one process; see the CSV files for quartiles.", ""]

    if train is not None and len(train):
        spread = float(train.spread.max())
        verdict = "quiet" if spread <= NOISY_SPREAD else "**noisy: something else used the CPU; rerun on an idle machine**"
        lines += [f"Training-step noise: the widest interquartile range of per-round ratios to full precision, over "
                  f"their median, is {spread:.1%} ({verdict}; the threshold is {NOISY_SPREAD:.0%}).", ""]
    checks = acceptance(ops, saved, train)
    if checks:
        lines += ["## Targets (issue 7), on this run", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {target} | {measured} | {'yes' if met else 'no'} |" for target, measured, met in checks]
        lines.append("")

    if len(ops):
        lines += ops_markdown(ops)
    if len(saved):
        lines += saved_markdown(saved)
    if train is not None:
        lines += train_markdown(train)
    lines += [f"Load average at the end: {load_average()}", ""]
    (out / "results.md").write_text("\n".join(lines))


def ops_markdown(ops: pd.DataFrame) -> list[str]:
    lines = ["## Forward+backward, ratios", ""]
    lines += ["`vs relu` / `vs clone`: the contender's median over relu's / clone's forward+backward median on the same "
              "tensor; `lsq speedup`: how many times slower than lsq's fast path the contender is.", ""]
    for (label, numel), group in ops.groupby(["size", "numel"], sort=False):
        lines += [f"### {label} ({numel} elements)", ""]
        table = group.pivot_table(index="contender", columns="bits", values=["median_ms", "vs_relu", "vs_clone", "lsq_speedup"],
                                  sort=False)
        flat = pd.DataFrame({"contender": table.index})
        for bits in BITS:
            if ("median_ms", bits) not in table.columns:
                continue
            flat[f"{bits}-bit ms"] = table[("median_ms", bits)].values
            flat[f"{bits}-bit vs relu"] = table[("vs_relu", bits)].values
            flat[f"{bits}-bit vs clone"] = table[("vs_clone", bits)].values
            flat[f"{bits}-bit lsq speedup"] = table[("lsq_speedup", bits)].values
        lines += [markdown_table(flat), ""]
    return lines


def saved_markdown(saved: pd.DataFrame) -> list[str]:
    input_bytes = int(saved.input_bytes.iloc[0])
    lines = ["## Bytes saved for backward", "", f"One tensor of {input_bytes // 4} float32 elements "
             f"({input_bytes} bytes), 4 bits. `input sized` counts distinct saved storages at least as big as the "
              "input, the input included.", ""]
    lines += [markdown_table(saved[["role", "contender", "saved_tensors", "distinct_storages", "bytes_saved",
                                    "input_saved", "bytes_beyond_input", "input_sized_saved"]]), ""]
    return lines


def train_markdown(train: pd.DataFrame) -> list[str]:
    batch = int(train.batch.iloc[0])
    lines = ["## Pre-activation ResNet-20 training step", "",
             f"Batch {batch}, forward + cross-entropy + backward + SGD step; every conv/linear weight and input "
             f"quantized at {TRAIN_BITS} bits (first and last layer 8). `vs fp` is against full precision in the same "
             "mode (eager or compiled).", ""]
    lines += [markdown_table(train[["quantizer", "mode", "median_ms", "spread", "vs_fp_same_mode", "vs_fp_eager", "compile_s"]]), ""]
    return lines
