"""The trained digits runs the export tests read (integer and ONNX paths), trained once per session: one per
quantizer, plus lsq 4- and 2-bit with per-channel weight steps (a few batches each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantbench.config import TrainConfig
from quantbench.training.run import train

QUANTIZED = [("lsq", 2), ("lsq", 4), ("fixed", 2), ("qil", 2), ("pact", 2)]
# lsq with one weight step per output channel (each initialized on its own channel); a few batches keep them cheap
PER_CHANNEL = [("lsq-per-channel", 4), ("lsq-per-channel", 2)]
PER_CHANNEL_BATCHES = 6


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("export-runs")
    common = {"dataset": "digits", "model": "small_cnn", "epochs": 1, "threads": 1}
    train(TrainConfig(out=str(root / "fp"), **common), progress=False)
    made = {}
    for name, bits in QUANTIZED:
        out = root / f"{name}{bits}"
        train(TrainConfig(out=str(out), quantizer=name, bits=bits, init_from=str(root / "fp"), **common), progress=False)
        made[(name, bits)] = out
    for name, bits in PER_CHANNEL:
        out = root / f"{name}{bits}"
        train(TrainConfig(out=str(out), quantizer="lsq", bits=bits, init_from=str(root / "fp"),
                          weight_options={"per_channel": True}, max_train_batches=PER_CHANNEL_BATCHES, **common),
              progress=False)
        made[(name, bits)] = out
    return made
