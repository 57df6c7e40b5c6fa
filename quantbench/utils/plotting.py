"""Figure output shared by the commands that draw (fig2, gradscale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# No dates or versions in the files, so regenerating an unchanged figure gives identical bytes.
REPRODUCIBLE_FORMATS = ((".png", {"dpi": 150, "metadata": {"Software": None}}), (".svg", {"metadata": {"Date": None}}))


def save_reproducible(figure: Any, path_stem: Path) -> list[Path]:
    """Save ``figure`` as ``<stem>.png`` and ``<stem>.svg`` without timestamps; returns the paths."""
    written = []
    for suffix, extra in REPRODUCIBLE_FORMATS:
        path = path_stem.parent / (path_stem.name + suffix)
        figure.savefig(path, **extra)
        written.append(path)
    return written
