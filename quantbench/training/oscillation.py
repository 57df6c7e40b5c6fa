"""Weight oscillation in QAT (Nagel et al., ICML 2022): tracking, dampening and iterative freezing, for any quantizer.

Everything goes through the ``Quantizer`` interface (its output, ``levels()``, ``idempotent``, ``bits``), so plugins
get it too. Definitions (the README's conventions table):

* a weight's **code** is the index of its quantized value in the quantizer's sorted ``levels()`` (nearest level, so
  float noise between the two computations cannot matter); on a uniform per-tensor grid it is the integer code + Q_N.
  A per-channel quantizer's ``levels()`` is the union of its channels' grids, so there a code is an index into that
  union (a step change can reorder it: read per-channel oscillation numbers with care).
* a **flip** is a change of code between consecutive steps; an **oscillation** is a flip opposite in direction to the
  weight's previous flip; the **frequency** is its exponential moving average (momentum 0.01), as in Qualcomm's
  ``TrackOscillation``. A weight is **oscillating** when its frequency exceeds ``OSCILLATING`` (0.02).
* **dampening** adds ``lambda_t * sum (stopgrad(Q(w)) - clip(w))^2`` to the loss, ``clip`` to the levels' range and
  ``lambda_t`` annealed from 0 to lambda by a cosine over training (the paper's code anneals weight -> weight_final).
* **freezing** fixes, once its frequency exceeds the threshold, a weight's code at the level nearest to the EMA of
  its quantized value (the paper's ``round(ema_x_int)``) for the rest of training, in layers of at most 4 bits (the
  paper's ``max_bits``); range parameters keep learning. Only latent weights can be set through the interface: after
  every optimizer step a frozen weight is put back on its code's level (``levels()[code]``), which an idempotent
  quantizer maps to itself. A non-idempotent quantizer (a warp before its grid, e.g. DoReFa's tanh) or a per-channel
  one (``levels()`` merges several grids) instead keeps the latent value it had when frozen.

The tracker runs every step on the device (no host synchronization), on a fixed sample of ``SAMPLE`` weights per
layer unless freezing needs every weight; ``summaries`` hands back device tensors that
:mod:`quantbench.training.dynamics` transfers once per recording. On CPU (float32, without freezing) a step's codes
and flat-state update are one native call for all layers (``quantizers/kernels/native_oscillation.c``: the same
codes and flags, frequencies to float32 rounding), which keeps tracking within a few percent of a small model's step.
"""

from __future__ import annotations

import ctypes
import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from quantizers import Quantizer
from quantizers.kernels import native
from quantizers.kernels.dispatch import native_library

MOMENTUM = 0.01  # the paper's EMA momentum
OSCILLATING = 0.02  # frequency above which a weight counts as oscillating (2x the momentum, as the paper advises)
FREEZE_MAX_BITS = 4  # the paper freezes layers of at most 4 bits; 8-bit first/last layers are only tracked
#: Without freezing, oscillation is tracked on a fixed random sample of at most this many weights per layer: the
#: per-step cost then grows with the number of layers, not of weights (a fraction's standard error stays <= 0.008).
SAMPLE = 4096
#: the per-weight state kept in one flat tensor across layers: the code, whether the code ever changed, whether its
#: last change was upwards (booleans: the per-step arithmetic runs on bytes), the oscillation frequency
FLAT_KEYS = ("code", "moved", "rising", "frequency")


def weight_quantizers(model: nn.Module) -> list[tuple[str, nn.Parameter, Quantizer]]:
    """(layer name, latent weight, weight quantizer) of every layer with a quantized weight, in module order."""
    from quantbench.qat import quantized_layers

    return [(name, layer.weight, layer.weight_quantizer) for name, layer in quantized_layers(model)
            if layer.weight_quantizer is not None]


def nearest_codes(values: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of the sorted ``levels`` for every element of ``values`` (int64, same shape)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(values.detach().to(levels.dtype).contiguous(), midpoints.contiguous())


def dampening_weight(lam: float, step: int, total_steps: int) -> float:
    """The dampening coefficient at ``step``: cosine annealing from 0 to ``lam`` over training."""
    return lam * 0.5 * (1.0 - math.cos(math.pi * min(1.0, step / max(1, total_steps))))


def holds_codes(quantizer: Quantizer, levels: Tensor) -> bool:
    """Whether a frozen weight can be held at its code: the quantizer maps its levels to themselves (idempotent) and
    has one grid (at most 2^bits levels; a per-channel quantizer's levels() merges several, where an index is no
    code). Otherwise the latent weight is held at its value when frozen."""
    return bool(quantizer.idempotent) and levels.numel() <= 2**quantizer.bits


class OscillationTracker:
    """Codes, flips, oscillation frequencies and (optionally) frozen weights of every quantized weight of a model.

    ``update()`` is called once per step after backward and before the optimizer step (the weights of this step's
    forward); ``hold_frozen()`` after the optimizer step (registered as an optimizer post-hook by ``attach``)."""

    def __init__(self, model: nn.Module, freeze: float = 0.0, dampen: float = 0.0, total_steps: int = 1) -> None:
        self.layers = weight_quantizers(model)
        self.freeze, self.dampen, self.total_steps = float(freeze), float(dampen), max(1, total_steps)
        self.state: list[dict[str, Tensor]] = [{} for _ in self.layers]
        self._quantized: tuple[int, list[Tensor]] | None = None  # (step, Q(w) per layer): shared by loss and update
        # Q(w) of this step's forward, captured by a hook on each weight quantizer: no second quantization per step
        self._captured: list[Tensor | None] = [None for _ in self.layers]
        self._hooks = [quantizer.register_forward_hook(self._capture(index))
                       for index, (_, _, quantizer) in enumerate(self.layers)]
        generator = torch.Generator().manual_seed(0)  # the same sample in every run and on every rank
        self.samples: list[Tensor | None] = [
            None if self.freeze > 0 or weight.numel() <= SAMPLE
            else torch.randperm(weight.numel(), generator=generator)[:SAMPLE].sort().values.to(weight.device)
            for _, weight, _ in self.layers]
        # Codes, directions and frequencies of all layers live in one flat tensor each (``state[i]`` holds views of
        # layer i's slice): the per-step arithmetic is then a handful of ops per step, not per layer.
        self.sizes = [weight.numel() if sample is None else sample.numel()
                      for (_, weight, _), sample in zip(self.layers, self.samples)]
        self._flat: dict[str, Tensor] = {}
        self._flipped_flat: Tensor | None = None
        # the samples' addresses for the native step (0: every element)
        self._sample_pointers = (ctypes.c_int64 * len(self.layers))(
            *[0 if sample is None else sample.data_ptr() for sample in self.samples])

    # ---- per step -------------------------------------------------------------------------------------------------

    def _capture(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self._captured[index] = output.detach()
        return hook

    def quantized(self, step: int) -> list[Tensor]:
        """Q(w) of every layer at ``step`` (no gradient): this step's forward's, or computed once when there was none
        (e.g. called without a forward)."""
        if self._quantized is None or self._quantized[0] != step:
            with torch.no_grad():
                self._quantized = (step, [captured if captured is not None else quantizer(weight).detach()
                                          for captured, (_, weight, quantizer) in zip(self._captured, self.layers)])
            self._captured = [None for _ in self.layers]  # a later step must come from its own forward
        return self._quantized[1]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def dampening_loss(self, step: int) -> Tensor:
        """``lambda_t * sum (stopgrad(Q(w)) - clip(w))^2`` over every quantized weight (added to the loss)."""
        coefficient = dampening_weight(self.dampen, step, self.total_steps)
        terms = []
        for (_, weight, quantizer), target in zip(self.layers, self.quantized(step)):
            levels = quantizer.levels().detach()
            # clipped to the levels' range, so the term never pulls on weights the quantizer clips anyway
            clipped = torch.clamp(weight, levels[0].to(weight.dtype), levels[-1].to(weight.dtype))
            terms.append((target - clipped).pow(2).sum())
        return coefficient * torch.stack(terms).sum() if terms else torch.zeros(())

    def update(self, step: int) -> None:
        """Codes of this step's weights; flips, oscillation EMA and freezing decisions (all on the device)."""
        if not self.layers:
            return
        with torch.no_grad():
            quantized = self.quantized(step)
            levels_all = [quantizer.levels().detach() for _, _, quantizer in self.layers]
            if self._native_step(quantized, levels_all):
                return
            quantized_all, codes = [], []
            for values, levels, sample in zip(quantized, levels_all, self.samples):
                values = values.reshape(-1)  # state is flat (over the sample, when sampling)
                if sample is not None:
                    values = values.index_select(0, sample)
                quantized_all.append(values)
                codes.append(nearest_codes(values, levels))  # int64 as bucketize gives it: no conversion per step
            codes = torch.cat(codes)
            if not self._flat:
                self._start(codes, quantized_all, levels_all)
                return
            flat = self._flat
            changed = codes != flat["code"]
            rising = codes > flat["code"]
            # an oscillation: a change opposite to the weight's previous change
            oscillated = changed & flat["moved"] & (rising != flat["rising"])
            flat["frequency"].lerp_(oscillated.to(flat["frequency"].dtype), MOMENTUM)  # EMA of oscillations
            flat["rising"].copy_(torch.where(changed, rising, flat["rising"]))
            flat["moved"].logical_or_(changed)
            flat["code"].copy_(codes)
            self._flipped_flat = changed  # reduced only when recorded
            for index, (_, weight, quantizer) in enumerate(self.layers):
                if "frozen" in self.state[index]:
                    self._freeze(self.state[index], weight, quantizer, levels_all[index], quantized_all[index])

    def _native_step(self, quantized: list[Tensor], levels: list[Tensor]) -> bool:
        """This step's codes and flat-state update in one native call; False (nothing done) where it does not apply:
        the first step, freezing, or tensors that are not float32 CPU (the native backend's rule)."""
        flat = self._flat
        if not flat or self.freeze > 0 or flat["code"].device.type != "cpu":
            return False
        values = [tensor.contiguous() for tensor in quantized]
        levels = [tensor.contiguous() for tensor in levels]
        if not all(native.eligible(tensor) for tensor in values + levels):
            return False
        library = native_library(values[0])
        if library is None:
            return False
        if self._flipped_flat is None:  # the native step writes this step's flips into one buffer
            self._flipped_flat = torch.zeros_like(flat["moved"])
        count = len(values)
        status = library.oscillation_step(
            count, (ctypes.c_int64 * count)(*[tensor.data_ptr() for tensor in values]), self._sample_pointers,
            (ctypes.c_int64 * count)(*self.sizes), (ctypes.c_int64 * count)(*[tensor.data_ptr() for tensor in levels]),
            (ctypes.c_int64 * count)(*[tensor.numel() for tensor in levels]), flat["code"].data_ptr(),
            flat["moved"].data_ptr(), flat["rising"].data_ptr(), flat["frequency"].data_ptr(),
            self._flipped_flat.data_ptr(), MOMENTUM)
        if status != 0:
            raise MemoryError("oscillation tracking: out of memory for the level midpoints")
        return True

    def _start(self, codes: Tensor, quantized: list[Tensor], levels: list[Tensor]) -> None:
        """The first step's codes: no flip yet; freezing state for the layers that freeze."""
        never = torch.zeros_like(codes, dtype=torch.bool)
        self._adopt({"code": codes, "moved": never, "rising": never.clone(),
                     "frequency": torch.zeros_like(codes, dtype=torch.float32)})
        for index, (_, weight, quantizer) in enumerate(self.layers):
            state = self.state[index]
            if self.freeze > 0 and quantizer.bits <= FREEZE_MAX_BITS:
                state.update(ema=quantized[index].float().clone(), frozen=torch.zeros_like(state["code"], dtype=torch.bool))
                if holds_codes(quantizer, levels[index]):
                    state["frozen_code"] = torch.zeros_like(state["code"], dtype=torch.int64)
                else:
                    state["frozen_value"] = weight.detach().reshape(-1).clone()

    def _slices(self) -> list[slice]:
        """Each layer's slice of the flat state."""
        ends = list(itertools.accumulate(self.sizes))
        return [slice(end - size, end) for end, size in zip(ends, self.sizes)]

    def _adopt(self, flat: dict[str, Tensor]) -> None:
        """Make ``flat`` the tracked codes/directions/frequencies; each layer's state gets views of its slice."""
        self._flat = flat
        for state, layer in zip(self.state, self._slices()):
            for key, values in flat.items():
                state[key] = values[layer]

    def _freeze(self, state: dict[str, Tensor], weight: Tensor, quantizer: Quantizer, levels: Tensor,
                quantized: Tensor) -> None:
        newly = (state["frequency"] > self.freeze) & ~state["frozen"]
        if "frozen_code" in state:  # the level nearest to the EMA of the quantized value (the paper's round(ema))
            state["frozen_code"] = torch.where(newly, nearest_codes(state["ema"], levels), state["frozen_code"])
        else:
            state["frozen_value"] = torch.where(newly, weight.detach().reshape(-1), state["frozen_value"])
        state["frozen"] |= newly
        state["ema"].mul_(1 - MOMENTUM).add_(quantized.float(), alpha=MOMENTUM)  # after the decision, as the paper
        if weight.grad is not None:  # no momentum builds up behind a frozen weight
            weight.grad.masked_fill_(state["frozen"].view(weight.shape), 0.0)

    def hold_frozen(self, *_: Any) -> None:
        """Put frozen weights back at their frozen values (after the optimizer step moved them)."""
        if self.freeze <= 0:
            return
        with torch.no_grad():
            for (_, weight, quantizer), state in zip(self.layers, self.state):
                if "frozen" not in state:
                    continue
                if "frozen_code" in state:  # at the code's level under the range parameters just updated
                    held = quantizer.levels().detach().to(weight.dtype)[state["frozen_code"]]
                else:
                    held = state["frozen_value"]
                frozen = state["frozen"].view(weight.shape)
                weight.copy_(torch.where(frozen, held.view(weight.shape), weight))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hold frozen weights after every optimizer step (only when freezing)."""
        if self.freeze > 0:
            optimizer.register_step_post_hook(self.hold_frozen)

    # ---- recording ----------------------------------------------------------------------------------------------

    def summaries(self, index: int) -> dict[str, Tensor]:
        """Device scalars for layer ``index``: mean frequency, oscillating / flipped (last step) / frozen fractions."""
        state = self.state[index]
        if not state:
            return {}
        summary = {"oscillation_frequency": state["frequency"].mean(),
                   "oscillating_fraction": (state["frequency"] > OSCILLATING).float().mean()}
        if self._flipped_flat is not None:
            summary["flip_fraction"] = self._flipped_flat[self._slices()[index]].float().mean()
        if "frozen" in state:
            summary["frozen_fraction"] = state["frozen"].float().mean()
        return summary

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # clones: a view would save the whole flat tensor once per layer
        return {"layers": [name for name, _, _ in self.layers],
                "state": [{k: v.detach().cpu().clone() for k, v in s.items()} for s in self.state]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved.get("layers") != [name for name, _, _ in self.layers]:
            return  # another model: start tracking afresh rather than misassign state
        for (_, weight, _), state, values in zip(self.layers, self.state, saved["state"]):
            state.clear()
            state.update({k: v.to(weight.device) for k, v in values.items()})
        if (all(set(FLAT_KEYS) <= set(state) for state in self.state)
                and [s["code"].numel() for s in self.state] == self.sizes):
            self._adopt({key: torch.cat([state[key] for state in self.state]) for key in FLAT_KEYS})
        else:  # saved before any step, by another sampling or an older version: start tracking afresh
            for state in self.state:
                state.clear()
            self._flat = {}
