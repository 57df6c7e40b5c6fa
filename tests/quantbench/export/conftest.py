"""The trained digits runs the export tests read (integer and ONNX paths), trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantbench.config import TrainConfig
from quantbench.training.run import train

QUANTIZED = [("lsq", 2), ("lsq", 4), ("fixed", 2), ("qil", 2), ("pact", 2)]


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
    return made
