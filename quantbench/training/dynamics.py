"""Training dynamics of a quantized run, recorded every ``dynamics_every`` steps into ``RUN/dynamics.csv``.

Tidy rows ``step, epoch, layer, role, quantity, value``; per quantized layer and role (weight, activation):

* one row per range parameter (``Quantizer.range_parameters()``; the mean over its elements for a vector, e.g.
  per-channel steps), and ``grid_step``, the smallest spacing of ``levels()``;
* ``clip_fraction``: the fraction of the quantizer's input outside ``[min(levels), max(levels)]`` (weights: the latent
  weights; activations: this step's batch on rank 0). Recorded only for idempotent quantizers: a non-idempotent one
  (a warp before its grid, as DoReFa's tanh) has levels in output units, which say nothing about its input's range;
* weights: ``oscillation_frequency`` (mean), ``oscillating_fraction``, ``flip_fraction`` and, when freezing,
  ``frozen_fraction`` (definitions in :mod:`quantbench.training.oscillation`);
* layer ``-``: ``loss``, ``batch_top1`` and ``lr`` of the recorded step.

A row describes the state used by that step's forward (recorded after backward, before the optimizer step). Step 0
and the last step are always recorded. Values are computed on the device and moved to the host once per recording.
Rows are buffered and written at each checkpoint (``flush``, atomically: the file is copied with the new rows appended
and renamed into place); a resumed run first drops rows at or after its resume step, so no row is ever duplicated.
Only rank 0 writes; every rank tracks oscillations (freezing must decide the same on every rank).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantbench.qat import quantized_layers
from quantbench.training.oscillation import OscillationTracker
from quantbench.utils.io import atomic_path

COLUMNS = ("step", "epoch", "layer", "role", "quantity", "value")
GLOBAL = "-"  # the layer of run-wide rows (loss, batch accuracy, LR)


def clip_fraction(values: Tensor, quantizer: nn.Module) -> Tensor | None:
    """Fraction of ``values`` outside the range of ``quantizer.levels()`` (a device scalar), or None when the levels
    are not in the input's units (a non-idempotent quantizer) or the quantizer is not initialized yet."""
    if not quantizer.idempotent or not quantizer._is_initialized:
        return None
    levels = quantizer.levels().detach()
    values = values.detach()
    return ((values < levels[0]) | (values > levels[-1])).float().mean()


class Dynamics:
    """The per-step callback of a quantized run: oscillation tracking every step, a recording every ``every`` steps.

    ``every = 0`` records nothing (tracking still runs when a remedy needs it)."""

    def __init__(self, model: nn.Module, out: Path, every: int, steps_per_epoch: int, total_steps: int,
                 tracker: OscillationTracker, main: bool = True, start_step: int = 0, writer: Any = None) -> None:
        self.model, self.path, self.every = model, Path(out) / "dynamics.csv", every
        self.steps_per_epoch, self.total_steps, self.tracker = steps_per_epoch, total_steps, tracker
        self.main, self.writer = main, writer
        self.layers = [(name, layer) for name, layer in quantized_layers(model)]
        self.rows: list[tuple[Any, ...]] = []
        self._activations: dict[str, Tensor] = {}
        self._hooks: list[Any] = []
        self.optimizer: torch.optim.Optimizer | None = None
        if main and every:
            self._truncate(start_step)
            self._arm(start_step)

    @property
    def recording(self) -> bool:
        return bool(self.every) and self.main

    def records(self, step: int) -> bool:
        return self.recording and (step % self.every == 0 or step == self.total_steps - 1)

    # ---- the callback ---------------------------------------------------------------------------------------------

    def extra_loss(self, step: int) -> Tensor:
        """The dampening term (the loop adds it to the loss)."""
        return self.tracker.dampening_loss(step)

    def on_step(self, step: int, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        if self.every or self.tracker.freeze:  # tracking costs a weight quantization per step: only when used
            self.tracker.update(step)
        if self.records(step):
            self._record(step, loss, logits, labels)
        self._disarm()
        if self.records(step + 1):
            self._arm(step + 1)

    def _arm(self, step: int) -> None:
        """Capture the next forward's activation clip fractions (hooks exist only for recorded steps)."""
        if not self.records(step):
            return
        for name, layer in self.layers:
            quantizer = layer.input_quantizer
            if quantizer is not None:
                def capture(module: nn.Module, inputs: tuple[Tensor, ...], name: str = name) -> None:
                    fraction = clip_fraction(inputs[0], module)
                    if fraction is not None:
                        self._activations[name] = fraction
                self._hooks.append(quantizer.register_forward_pre_hook(capture))

    def _disarm(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _record(self, step: int, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        keys: list[tuple[str, str, str]] = []
        values: list[Tensor] = []

        def add(layer: str, role: str, quantity: str, value: Tensor | None) -> None:
            if value is not None:
                keys.append((layer, role, quantity))
                values.append(value.detach().float().reshape(()).to(loss.device))

        with torch.no_grad():
            add(GLOBAL, "-", "loss", loss)
            add(GLOBAL, "-", "batch_top1", 100 * (logits.argmax(1) == labels).float().mean())
            tracked = {name: index for index, (name, _, _) in enumerate(self.tracker.layers)}
            for name, layer in self.layers:
                for role, quantizer in (("weight", layer.weight_quantizer), ("activation", layer.input_quantizer)):
                    if quantizer is None:
                        continue
                    for parameter, tensor in quantizer.range_parameters().items():
                        add(name, role, parameter, tensor.mean())
                    levels = quantizer.levels().detach()
                    if levels.numel() > 1:
                        add(name, role, "grid_step", (levels[1:] - levels[:-1]).min())
                    if role == "weight":
                        add(name, role, "clip_fraction", clip_fraction(layer.weight, quantizer))
                        for quantity, value in self.tracker.summaries(tracked[name]).items():
                            add(name, role, quantity, value)
                    else:
                        add(name, role, "clip_fraction", self._activations.pop(name, None))
            numbers = torch.stack(values).tolist()  # the one host transfer of this recording
        epoch = step // self.steps_per_epoch
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        if lr is not None:
            keys.append((GLOBAL, "-", "lr"))
            numbers.append(lr)
        self.rows.extend((step, epoch, *key, value) for key, value in zip(keys, numbers))
        if self.writer is not None:
            for (layer, role, quantity), value in zip(keys, numbers):
                tag = f"train/{quantity}" if layer == GLOBAL else f"dynamics/{quantity}/{layer}.{role}"
                self.writer.add_scalar(tag, value, step)

    # ---- the file -------------------------------------------------------------------------------------------------

    def _truncate(self, start_step: int) -> None:
        """Drop rows at or after ``start_step`` (written after the checkpoint this run resumes from, or by an earlier
        run in this directory that never checkpointed)."""
        if not self.path.exists():
            return
        import pandas as pd

        from quantbench.utils.io import write_csv

        try:
            frame = pd.read_csv(self.path)
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame(columns=COLUMNS)
        if start_step == 0:
            self.path.unlink()
        elif (frame["step"] >= start_step).any():
            write_csv(self.path, frame[frame["step"] < start_step])

    def flush(self) -> None:
        """Append the buffered rows to ``dynamics.csv`` atomically (call before saving the checkpoint)."""
        if self.writer is not None:
            self.writer.flush()
        if not self.recording or not self.rows:
            return
        import csv

        with atomic_path(self.path) as temporary:
            exists = self.path.exists()
            if exists:
                shutil.copyfile(self.path, temporary)
            with open(temporary, "a", newline="") as handle:
                writer = csv.writer(handle)
                if not exists:
                    writer.writerow(COLUMNS)
                writer.writerows(self.rows)
        self.rows.clear()

    def end_epoch(self, row: dict[str, Any], step: int) -> None:
        """After an epoch, before its checkpoint: append the buffered rows; the epoch's metrics to TensorBoard."""
        if self.writer is not None:
            from quantbench.training.tensorboard import log_epoch

            log_epoch(self.writer, row, step)
        self.flush()

    def close(self) -> None:
        self._disarm()
        self.tracker.close()
        if self.writer is not None:
            self.writer.close()

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.tracker.load_state_dict(saved["tracker"])


def for_run(model: nn.Module, config: Any, out: Path, trainer: Any, main: bool, start_epoch: int,
            saved: dict[str, Any] | None = None) -> Dynamics | None:
    """The dynamics callback of one ``train`` run, wired to its trainer (dampening loss, frozen-weight hold), or None
    for a full-precision run without ``--tensorboard``."""
    if config.quantizer is None and not config.tensorboard:
        return None
    steps, total = trainer.steps_per_epoch, trainer.steps_per_epoch * config.epochs
    start_step = start_epoch * steps
    tracker = OscillationTracker(model, freeze=config.oscillation_freeze, dampen=config.oscillation_dampen,
                                 total_steps=total)
    if config.compile:
        tracker.close()  # a Python hook inside the compiled graph would break it: Q(w) is recomputed instead
    writer = None
    if config.tensorboard and main:
        from quantbench.training.tensorboard import open_writer

        writer = open_writer(out, start_step)
    dynamics = Dynamics(model, out, config.dynamics_every, steps, total, tracker, main, start_step, writer)
    dynamics.load_state_dict(saved)
    dynamics.optimizer = trainer.optimizer
    tracker.attach(trainer.optimizer)
    if config.oscillation_dampen:
        trainer.extra_loss = dynamics.extra_loss
    return dynamics
