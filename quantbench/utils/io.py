"""Atomic file writes: every file quantbench writes goes through here, so a reader (or an interrupted run) never sees
half a file. Each writer writes a temporary file beside the target and renames it into place (``os.replace``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def read_json(path: str | Path, fix: str) -> Any:
    """A JSON file quantbench wrote, or one line naming the file and ``fix`` (what to do) when it is empty or torn
    (a crash or a full disk during an older, non-atomic write; a copy cut short)."""
    import json

    from quantbench.errors import QuantbenchError

    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QuantbenchError(f"{path} is empty or not valid JSON ({error.__class__.__name__}); {fix}") from None


def write_json(path: str | Path, payload: Any) -> Path:
    """Indented JSON (anything else as ``str``), newline-terminated."""
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_csv(path: str | Path, rows: Any, **to_csv: Any) -> Path:
    """A DataFrame, or a list of dict rows, as CSV (``to_csv`` options passed through; no index by default)."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, **{"index": False, **to_csv})
    return Path(path)


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically."""
    import torch

    with atomic_path(path) as temporary:
        torch.save(obj, temporary)
    return Path(path)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a lock's owner, a worker): signal 0 checks without signalling."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True
