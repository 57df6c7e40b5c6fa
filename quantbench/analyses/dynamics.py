"""``quantbench dynamics RUN [RUN ...] --out DIR``: figures and a summary of the training dynamics that quantized runs
recorded in ``dynamics.csv`` (see :mod:`quantbench.training.dynamics`), for one run or several side by side.

Writes into DIR:

* ``ranges.png``: every range parameter (and ``grid_step``) over training, relative to its first recorded value (so
  methods with different parameterizations share an axis: "did the step move?"), per layer, weights and activations;
* ``clip_fraction.png``: the fraction of inputs outside the levels' range over training;
* ``oscillation.png``: mean oscillation frequency and the fraction of oscillating weights over training;
* ``summary.md``: per run and layer, first and last values, the relative change of each range parameter, the final
  clip fraction and oscillation numbers, and the command that made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from quantbench.errors import QuantbenchError
from quantbench.training.dynamics import COLUMNS  # noqa: E402
from quantbench.utils.io import atomic_path, write_text  # noqa: E402

OSCILLATION = ("oscillation_frequency", "oscillating_fraction")
NOT_RANGES = {"clip_fraction", "flip_fraction", "frozen_fraction", *OSCILLATION}


def run_label(directory: Path) -> str:
    """``quantizer bits-bit`` from the run's config (plus the remedies when on), else the directory name."""
    try:
        train = json.loads((directory / "config.json").read_text())["train"]
    except (OSError, ValueError, KeyError):
        return directory.name
    label = f"{train.get('quantizer') or 'fp'} {train.get('bits') or 32}-bit"
    for key, short in (("oscillation_dampen", "dampen"), ("oscillation_freeze", "freeze")):
        if train.get(key):
            label += f" {short}={train[key]:g}"
    return label


def load_runs(runs: list[str | Path]) -> pd.DataFrame:
    """Every run's ``dynamics.csv`` with a ``run`` column (labels made unique); one-line errors for bad input."""
    if not runs:
        raise QuantbenchError("give at least one run directory: quantbench dynamics RUN [RUN ...] --out DIR")
    frames, seen = [], set()
    for run in runs:
        directory = Path(run)
        path = directory / "dynamics.csv"
        if not path.is_file():
            raise QuantbenchError(f"{directory} has no dynamics.csv: give a quantized quantbench train run directory "
                                  "(recorded with --dynamics-every > 0)")
        try:
            frame = pd.read_csv(path, dtype={"value": float})
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame()
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:  # garbage, not a CSV we wrote
            raise QuantbenchError(f"{path} is not a dynamics.csv quantbench wrote ({type(error).__name__}); "
                                  "train the run again to record it") from None
        if frame.empty:
            raise QuantbenchError(f"{path} holds no rows yet: let the run finish an epoch")
        key_columns = [c for c in COLUMNS if c != "value"]  # a value may be NaN (a diverged run); the keys may not
        with path.open("rb") as stream:
            stream.seek(-1, 2)
            torn_end = stream.read(1) != b"\n"  # every row ends in a newline; a cut write does not
        if list(frame.columns) != list(COLUMNS) or frame[key_columns].isna().any(axis=None) or torn_end:
            # a row torn by a crash mid-write, or another file: summarizing part of it would mislead
            torn = (int(frame[key_columns].isna().any(axis=1).sum()) or 1) if list(frame.columns) == list(COLUMNS) else len(frame)
            raise QuantbenchError(f"{path} has {torn} incomplete row(s) (a write cut short?) or unexpected columns; "
                                  "train the run again, or delete the incomplete last line to use the rest")
        label = run_label(directory)
        if label in seen:
            label = f"{label} ({directory.name})"
        seen.add(label)
        frames.append(frame.assign(run=label))
    return pd.concat(frames, ignore_index=True)


def relative_ranges(frame: pd.DataFrame) -> pd.DataFrame:
    """Range parameters and ``grid_step`` of quantized layers, divided by their first recorded value."""
    ranges = frame[(frame["layer"] != "-") & ~frame["quantity"].isin(NOT_RANGES)].sort_values("step").copy()
    first = ranges.groupby(["run", "layer", "role", "quantity"])["value"].transform("first")
    ranges["relative"] = ranges["value"] / first.where(first.abs() > 0)
    return ranges


def _plot(data: pd.DataFrame, y: str, path: Path, row: str, ylabel: str, runs: int) -> Path | None:
    if data.empty:
        return None
    grid = sns.relplot(data=data, x="step", y=y, hue="layer", style="quantity" if data["quantity"].nunique() > 1 else None,
                       row=row, col="run", kind="line", height=2.6, aspect=1.3, facet_kws={"sharey": "row"},
                       col_order=list(dict.fromkeys(data["run"])), errorbar=None)
    grid.set_axis_labels("step", ylabel)
    grid.set_titles("{col_name} | {row_name}" if runs > 1 else "{row_name}")
    with atomic_path(path) as temporary:
        grid.savefig(temporary, format="png", dpi=110)
    plt.close(grid.figure)
    return path


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run, layer, role and quantity: first and last recorded value and the relative change of range values."""
    quantized = frame[frame["layer"] != "-"].sort_values("step")
    grouped = quantized.groupby(["run", "layer", "role", "quantity"], sort=False)["value"]
    table = pd.DataFrame({"first": grouped.first(), "last": grouped.last()}).reset_index()
    ranges = ~table["quantity"].isin(NOT_RANGES)
    table["change_%"] = (100 * (table["last"] / table["first"] - 1)).where(ranges & (table["first"] != 0))
    return table


def markdown_table(frame: pd.DataFrame, floatfmt: str) -> str:
    """A pipe table (without the optional ``tabulate`` dependency that ``DataFrame.to_markdown`` needs)."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if value != value else format(value, floatfmt)
        return str(value)

    columns = [str(column) for column in frame.columns]
    rows = ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows])


def summary_markdown(frame: pd.DataFrame, figures: list[Path], command: str | None = None) -> str:
    table = summary_table(frame)
    lines = ["# Training dynamics", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines += [f"![{path.stem}]({path.name})" for path in figures] + [""]
    ranges = table[~table["quantity"].isin(NOT_RANGES)]
    if not ranges.empty:
        moved = ranges.groupby(["run", "role"])["change_%"].apply(lambda v: v.abs().median()).unstack("role")
        lines += ["## Did the ranges move? (median over layers of |last / first - 1|, percent)", "",
                  markdown_table(moved.reset_index(), ".2f"), ""]
    final = table[table["quantity"].isin(("clip_fraction", *OSCILLATION, "frozen_fraction"))]
    if not final.empty:
        pivot = final.pivot_table(index=["run", "layer", "role"], columns="quantity", values="last", sort=False)
        lines += ["## At the last recorded step", "", markdown_table(pivot.reset_index(), ".4f"), ""]
    lines += ["## Every range parameter", "", markdown_table(ranges, ".4g"), ""]
    return "\n".join(lines)


def write_dynamics(runs: list[str | Path], out: str | Path, command: str | None = None) -> list[Path]:
    """The figures and ``summary.md`` of the module docstring for ``runs``, into ``out``; returns the paths."""
    frame = load_runs(runs)
    directory = Path(out)
    if directory.exists() and not directory.is_dir():
        raise QuantbenchError(f"--out {out} is a file: give a directory for the figures and summary.md")
    directory.mkdir(parents=True, exist_ok=True)
    count = frame["run"].nunique()
    sns.set_theme(style="whitegrid", context="paper")
    figures = [
        _plot(relative_ranges(frame), "relative", directory / "ranges.png", "role", "value / first value", count),
        _plot(frame[frame["quantity"] == "clip_fraction"], "value", directory / "clip_fraction.png", "role",
              "clip fraction", count),
        _plot(frame[frame["quantity"].isin(OSCILLATION)], "value", directory / "oscillation.png", "quantity",
              "weights", count),
    ]
    written = [path for path in figures if path is not None]
    summary = write_text(directory / "summary.md", summary_markdown(frame, written, command))
    return [*written, summary]
