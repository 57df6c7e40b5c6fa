"""``quantbench dynamics``: figures and a summary of quantized runs' training dynamics (``dynamics.csv``)."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer
from rich.markup import escape

from quantbench.cli.app import app, console


@app.command("dynamics")
def dynamics_command(
    runs: Annotated[list[str], typer.Argument(help="Run directories of quantbench train (quantized), one or several.")],
    out: Annotated[str, typer.Option(help="Directory for ranges.png, clip_fraction.png, oscillation.png, summary.md.")],
) -> None:
    """Step/range trajectories, clip fractions and weight oscillation over training, one run or several side by side."""
    from quantbench.analyses.dynamics import write_dynamics

    command = " ".join(["quantbench", *map(shlex.quote, sys.argv[1:])])
    for path in write_dynamics(runs, out, command=command):
        console.print(f"wrote {escape(str(path))}")
