"""``quantbench status DIR``: where each cell of a comparison grid stands (from DIR/grid.json and the cells' files)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from quantbench.cli.app import app, console

STYLES = {"done": "green", "running": "cyan", "queued": "blue", "failed": "red", "pending": "dim"}


@app.command("status")
def status_command(
    directory: Annotated[str, typer.Argument(help="A quantbench compare directory.")],
    show_all: Annotated[bool, typer.Option("--all/--unfinished", help="List every cell, or only the unfinished.")] = True,
) -> None:
    """Each cell of a grid: done, running, queued (with its job id), failed (with the last line of its log), pending."""
    from quantbench.comparison.grid import MANIFEST, grid_states, read_manifest
    from quantbench.errors import QuantbenchError

    manifest = read_manifest(directory)
    if not manifest.get("cells"):
        raise QuantbenchError(f"{directory} has no readable {MANIFEST} (missing, torn or not a grid manifest); run "
                              f"quantbench compare --out {directory} to write it")
    held = _held_slurm_jobs(manifest)
    states = [(cell, state, detail) for cell, state, detail in grid_states(directory, held)
              if not cell.get("intermediate") or state != "done"]
    table = Table(title=f"{escape(str(Path(directory)))} ({manifest.get('launcher')}, updated {manifest.get('updated')})",
                  title_justify="left")
    for column in ("cell", "state", "job", "settings", "detail"):
        table.add_column(column, overflow="fold")
    for cell, state, detail in states:
        if show_all or state != "done":
            table.add_row(escape(cell["name"]), f"[{STYLES[state]}]{state}[/]", escape(str(cell.get("job_id") or "")),
                          cell["settings_hash"], escape(detail))
    console.print(table)
    for cell, state, detail in states:  # whole error lines, unwrapped, for the cells that need a fix
        if state == "failed":
            console.print(f"[red]failed[/] {escape(cell['name'])}: {escape(detail)}", soft_wrap=True)
    counts = Counter(state for _, state, _ in states)
    console.print(" · ".join(f"{counts[state]} {state}" for state in STYLES if counts[state]) + f" of {len(states)} cells")


def _held_slurm_jobs(manifest: dict) -> set[str] | None:
    """The grid's Slurm jobs still queued or running (one sacct call); None when there are none or no submitit."""
    jobs = [str(cell["job_id"]) for cell in manifest["cells"] if cell.get("launcher") == "slurm" and cell.get("job_id")]
    if not jobs:
        return None
    try:
        from quantbench.comparison.submit import queued_jobs, require_submitit

        require_submitit()
    except Exception:  # noqa: BLE001 - without submitit, status shows what grid.json recorded
        return None
    return queued_jobs(jobs)
