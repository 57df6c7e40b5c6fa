"""Rebuild a finished run from its directory (export, evaluate and qerror start here): the recorded config, the
data, and the model quantized exactly as it was trained, read from the run's own layer table (``layers.csv``: each
layer's bits and activation sign), with the final weights loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from quantbench.errors import QuantbenchError
from quantbench.utils.io import read_json


@dataclass
class LoadedRun:
    """A finished ``quantbench train`` run rebuilt from its directory: config, data and the trained model (eval)."""

    directory: Path
    config: Any  # quantbench.config.TrainConfig
    data: Any  # quantbench.data.DatasetBundle
    model: nn.Module


def read_train_config(run_dir: str | Path) -> Any:
    """The ``TrainConfig`` recorded in ``RUN_DIR/config.json``."""
    from quantbench.config import TrainConfig

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise QuantbenchError(f"{run_dir}: not a quantbench run directory (no config.json); give a `quantbench train --out` directory")
    recorded = read_json(path, "the run's config.json is damaged: train the run again").get("train", {})
    known = {f.name for f in fields(TrainConfig)}
    # Rebuilt on the CPU for analysis and integer inference, whatever device it trained on: the integer path
    # multiplies int32/int64 matrices, which CUDA does not implement (gpu-readiness item 4).
    values = {key: value for key, value in recorded.items() if key in known}
    return TrainConfig(**{**values, "device": "cpu", "sync_bn": False})


def read_layer_table(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The run's ``layers.csv`` as rows (None for a run that never wrote one)."""
    path = Path(run_dir) / "layers.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    return [{key: (None if pd.isna(value) else value) for key, value in row.items()} for row in table.to_dict("records")]


def load_run(run_dir: str | Path, data_dir: str | None = None, require_quantized: bool = True) -> LoadedRun:
    """Rebuild a trained run: the model as trained (quantizers included) with ``RUN_DIR/model.pt`` loaded, in eval mode.

    The model is quantized as the run's ``layers.csv`` records (bits and activation sign per layer), then the final
    state_dict is loaded, quantizer steps included. A run without a layer table (none is written before the first
    step) is quantized as ``train`` would: activation signs from the first test batch.
    """
    from quantbench.data import create_dataset
    from quantbench.training.run import build_model

    directory = Path(run_dir)
    config = read_train_config(directory)
    weights = directory / "model.pt"
    if not weights.is_file():
        raise QuantbenchError(f"{run_dir}: no model.pt, the run has not finished (resume it with quantbench train --resume)")
    if require_quantized and config.quantizer is None:
        raise QuantbenchError(f"{run_dir} is a full-precision run: nothing is quantized (give a run trained with --quantizer)")
    data = create_dataset(config.dataset, data_dir=data_dir or config.data_dir, download=False)
    layers = read_layer_table(directory)
    sample_input = None if layers is not None else first_test_batch(data, config.batch_size)[0]
    rebuild = replace(config, init_from=None, distill=False, pretrained=False)
    model, _ = build_model(rebuild, data, sample_input, layer_table=layers)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated or foreign file: one line naming it
        raise QuantbenchError(f"{weights} is truncated or not a PyTorch state_dict ({type(error).__name__}); train "
                              f"the run again (quantbench train ... --out {directory})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise QuantbenchError(f"{weights} does not fit the model its config.json describes: {str(error).splitlines()[0]}") from None
    model.eval()
    return LoadedRun(directory, config, data, model)


def first_test_batch(data: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """The first ``batch_size`` test images and labels (the test set is never shuffled)."""
    return next(iter(DataLoader(data.test, batch_size=batch_size, shuffle=False)))
