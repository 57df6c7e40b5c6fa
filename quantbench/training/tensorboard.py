"""``--tensorboard``: a ``torch.utils.tensorboard`` writer in ``RUN/tensorboard`` (an optional dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbench.errors import QuantbenchError

EPOCH_SCALARS = ("train_loss", "train_top1", "test_loss", "top1", "top5", "lr_end")


def open_writer(out: Path, start_step: int = 0) -> Any:
    """A SummaryWriter in ``out/tensorboard``; a resumed run drops events at or after ``start_step`` (``purge_step``),
    so a run interrupted after its last checkpoint shows no duplicated curve."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QuantbenchError("--tensorboard needs the tensorboard package: pip install quantbench[tensorboard]") from None
    return SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=start_step or None)


def log_epoch(writer: Any, row: dict[str, Any], step: int) -> None:
    """One epoch's metrics (an ``epochs.csv`` row) at global step ``step``."""
    for key in EPOCH_SCALARS:
        if row.get(key) is not None:
            writer.add_scalar(f"epoch/{key}", float(row[key]), step)
