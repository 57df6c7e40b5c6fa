"""Side-by-side summary of several runs of ``python -m benchmarks.quantizers``, written into a README between markers.

    python -m benchmarks.summary reports/benchmarks reports/benchmarks/run-2 [--readme reports/benchmarks/README.md]

Reads each run folder's ``ops.csv``, ``saved.csv``, ``train.csv`` (never re-measures) and replaces the text between
``<!-- summary:begin -->`` and ``<!-- summary:end -->`` in the README with: the issue's targets checked on every run,
the ResNet-20 step times of every run, and the op-level ratios of the first run. The prose around the markers is
the README's own, so every number in it comes from the runs' files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from benchmarks.report import acceptance
from benchmarks.settings import ACTIVATION_SHAPE, BITS, NOISY_SPREAD

BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"
OP_CONTENDERS = ("lsq", "lsq (compiled kernel)", "fixed", "pact", "qil", "clone", "lsq (reference path)",
                 "torch.ao fused", "paper pseudocode")


def load_run(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    missing = [name for name in ("ops.csv", "saved.csv") if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"{folder} has no {', '.join(missing)}: run `python -m benchmarks.quantizers --out {folder}` first")
    train = pd.read_csv(folder / "train.csv") if (folder / "train.csv").is_file() else None
    return pd.read_csv(folder / "ops.csv"), pd.read_csv(folder / "saved.csv"), train


def run_spread(train: pd.DataFrame | None) -> tuple[float, str] | None:
    """The run's noise: the widest per-round ratio spread (older runs: the step times' own spread), and what it is."""
    if train is None or not len(train):
        return None
    if "spread" in train:
        return float(train.spread.max()), "widest interquartile range of per-round step ratios to full precision"
    return (float(((train.q3_ms - train.q1_ms) / train.median_ms).max()),
            "widest interquartile range of step times (this run predates the ratio spread)")


def targets_table(runs: dict[str, tuple]) -> list[str]:
    checked = {label: acceptance(*data) for label, data in runs.items()}
    quiet = {label for label, data in runs.items() if (run_spread(data[2]) or (0.0, ""))[0] <= NOISY_SPREAD}
    targets = list(dict.fromkeys(target for checks in checked.values() for target, _, _ in checks))
    labels = list(runs)
    lines = ["| target | " + " | ".join(labels) + " | met in every quiet run |", "|---|" + "---|" * (len(labels) + 1)]
    for target in targets:
        cells, verdicts = [], []
        for label in labels:
            found = [(measured, met) for name, measured, met in checked[label] if name == target]
            cells.append((found[0][0] if found else "n/a") + ("" if label in quiet else " (noisy)"))
            if found and label in quiet:
                verdicts.append(bool(found[0][1]))
        met = "n/a" if not verdicts else ("yes" if all(verdicts) else "**no**")
        lines.append(f"| {target} | " + " | ".join(cells) + f" | {met} |")
    return lines


def noise_lines(runs: dict[str, tuple]) -> list[str]:
    lines = []
    for label, (_, _, train) in runs.items():
        measured = run_spread(train)
        if measured is not None:
            spread, what = measured
            verdict = "quiet" if spread <= NOISY_SPREAD else "**noisy** (disturbed: its ratios are weak evidence)"
            lines.append(f"* {label}: {what}: {spread:.1%} of the median, {verdict}")
    return lines


def train_table(runs: dict[str, tuple]) -> list[str]:
    lines = ["| quantizer | " + " | ".join(f"{label}: eager ms (vs fp) | {label}: compiled ms (vs fp)" for label in runs)
             + " |", "|---|" + "---|---|" * len(runs)]
    quantizers = None
    for _, _, train in runs.values():
        if train is not None:
            quantizers = list(dict.fromkeys(train.quantizer))
            break
    for quantizer in quantizers or []:
        cells = []
        for _, _, train in runs.values():
            for mode in ("eager", "compiled"):
                rows = None if train is None else train[(train.quantizer == quantizer) & (train["mode"] == mode)]
                if rows is None or not len(rows):
                    cells.append("n/a")
                else:
                    cells.append(f"{rows.median_ms.iloc[0]:.1f} ({rows.vs_fp_same_mode.iloc[0]:.3f}x)")
        lines.append(f"| {quantizer} | " + " | ".join(cells) + " |")
    return lines


def ops_table(ops: pd.DataFrame) -> list[str]:
    contenders = [name for name in OP_CONTENDERS if name in set(ops.contender)]
    lines = ["| elements | bits | " + " | ".join(contenders) + " |", "|---|---|" + "---|" * len(contenders)]
    for (size, numel), group in ops.groupby(["size", "numel"], sort=False):
        if numel < (1 << 22) and size != "activation":
            continue
        label = "x".join(map(str, ACTIVATION_SHAPE)) if size == "activation" else size
        for bits in BITS:
            by_bits = group[group.bits == bits].set_index("contender")
            cells = [f"{by_bits.vs_relu[name]:.2f}" if name in by_bits.index else "n/a" for name in contenders]
            lines.append(f"| {label} | {bits} | " + " | ".join(cells) + " |")
    return lines


def summary(folders: list[Path]) -> str:
    runs = {}
    for index, folder in enumerate(folders):
        label = f"`{folder}`" if f"`{folder}`" not in runs else f"`{folder}` (#{index + 1})"
        runs[label] = load_run(folder)
    first = next(iter(runs.values()))
    lines = [f"Generated by `python -m benchmarks.summary {' '.join(map(str, folders))}` from the runs' CSV files.", ""]
    lines += ["### Targets of issue 7, checked on each run", ""] + targets_table(runs) + [""]
    lines += [f"Noise (a run is noisy above {NOISY_SPREAD:.0%}):", ""] + noise_lines(runs) + [""]
    lines += ["### Pre-activation ResNet-20 training step (batch 128, 4 bits, first/last layer 8)", ""]
    lines += train_table(runs) + [""]
    lines += ["### Forward+backward on unsigned activations, first run: ratio to relu forward+backward", ""]
    lines += ops_table(first[0]) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by python -m benchmarks.quantizers")
    parser.add_argument("--readme", type=Path, default=None, help="README with the markers (default: first run's)")
    args = parser.parse_args(argv)
    readme = args.readme or args.runs[0] / "README.md"
    text = readme.read_text() if readme.is_file() else f"# Quantizer benchmark summary\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers: add them where the summary should go")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{summary(args.runs)}\n{END}{tail}")
    print(f"wrote the summary of {len(args.runs)} run(s) into {readme}")


if __name__ == "__main__":
    main()
