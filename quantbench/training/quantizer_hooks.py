"""The training loop's side of the quantizer contract's optional hooks: the training-stage signal before each step's
forward (``Quantizer.set_stage``), the after-step hook (``Quantizer.after_step``) and the extra loss term
(``Quantizer.regularization``, as :func:`quantbench.qat.regularization` sums it), for every quantizer of a model,
built-in or plugin.

Only quantizers whose class overrides a hook are called, so a model of hook-free quantizers costs nothing per step.
Under data parallelism the stage is a function of the global step, identical on every rank by construction; after
the after-step hooks, rank 0's parameters and buffers of every hooked quantizer are broadcast to all ranks, so state
updated outside autograd (from a rank's own batch) cannot drift apart, whatever a plugin's hook computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from quantizers import Quantizer
from quantizers.base import Stage


def _positions(model: nn.Module) -> tuple[dict[int, int], int]:
    """id(quantizer) -> index of its layer among the quantized layers (module order), and their count."""
    from quantbench.qat import quantized_layers

    positions: dict[int, int] = {}
    layers = quantized_layers(model)
    for index, (_, layer) in enumerate(layers):
        for quantizer in (layer.weight_quantizer, layer.input_quantizer):
            if quantizer is not None:
                positions[id(quantizer)] = index
    return positions, len(layers)


class QuantizerHooks:
    """The hooked quantizers of ``model`` and the two calls the training loop makes each step."""

    def __init__(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        self.steps_per_epoch, self.epochs = max(1, steps_per_epoch), max(1, epochs)
        self.total_steps = self.steps_per_epoch * self.epochs
        found = [module for module in model.modules() if isinstance(module, Quantizer)]
        positions, count = _positions(model)
        self.staged = [(quantizer, positions.get(id(quantizer), 0), count if id(quantizer) in positions else 1)
                       for quantizer in found if quantizer.hooks()["set_stage"]]
        self.stepped = [quantizer for quantizer in found if quantizer.hooks()["after_step"]]
        self.regularized = [quantizer for quantizer in found if quantizer.hooks()["regularization"]]

    def __bool__(self) -> bool:
        return bool(self.staged or self.stepped or self.regularized)

    def regularization(self) -> torch.Tensor | None:
        """The sum of the quantizers' extra loss terms, or None when no quantizer adds one (the others' terms are
        zero by definition: skipping them saves a dozen tensor ops per step)."""
        if not self.regularized:
            return None
        return torch.stack([quantizer.regularization() for quantizer in self.regularized]).sum()

    def before_step(self, step: int) -> None:
        """Give every staged quantizer the stage of global iteration ``step`` (before its forward)."""
        epoch = step // self.steps_per_epoch
        for quantizer, layer, layers in self.staged:
            quantizer.set_stage(Stage(step, self.total_steps, epoch, self.epochs, layer, layers))

    def after_step(self, step: int) -> None:
        """Run every after-step hook outside autograd, then make rank 0's state every rank's."""
        if not self.stepped:
            return
        with torch.no_grad():
            for quantizer in self.stepped:
                quantizer.after_step(step)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for quantizer in self.stepped:
                    for tensor in [*quantizer.parameters(), *quantizer.buffers()]:
                        dist.broadcast(tensor.data, src=0)


def describe(model: nn.Module) -> dict[str, Any]:
    """What the loop calls on this model's quantizers (recorded in the run's config.json)."""
    found = [module for module in model.modules() if isinstance(module, Quantizer)]
    hooked = {name: sorted({q.registry_name or type(q).__name__ for q in found if q.hooks()[name]})
              for name in ("set_stage", "after_step", "regularization")}
    return {
        **{f"{name}_quantizers": names for name, names in hooked.items()},
        "set_stage": "before each step's forward: Stage(step, total_steps, epoch, epochs, layer, layers)",
        "after_step": "after each optimizer step, under no_grad; rank 0's quantizer state then broadcast to all ranks",
        "regularization": "summed over quantizers into the loss each step",
    }
