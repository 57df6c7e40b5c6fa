"""``quantbench plan``: seeds needed per (quantizer, bits) and their cost, from a finished pilot comparison."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from quantbench.cli.app import app, console


@app.command("plan")
def plan_command(
    directory: Annotated[str, typer.Argument(help="A finished quantbench compare directory with 2+ seeds (a pilot).")],
    half_width: Annotated[Optional[float], typer.Option(help="Target half-width of the 95% paired interval, in points.")] = 0.5,
    detect: Annotated[Optional[float], typer.Option(help="Also: the difference in points to detect (paired t-test).")] = None,
    power: Annotated[float, typer.Option(help="Power for --detect.")] = 0.8,
    reference: Annotated[str, typer.Option(help="The quantizer every other is paired against.")] = "lsq",
    out: Annotated[Optional[str], typer.Option(help="Also write the table to this markdown file.")] = None,
) -> None:
    """How many seeds each difference needs (95% half-width, or a difference at a power) and what they cost."""
    from pathlib import Path

    from quantbench.comparison.power import plan, plan_markdown
    from quantbench.utils.io import write_text

    result = plan(directory, reference, half_width, detect, power)
    text = plan_markdown(result, half_width, detect, power)
    console.print(text, markup=False, soft_wrap=True)
    if out:
        write_text(Path(out), text + "\n")
        console.print(f"wrote {out}", markup=False)
