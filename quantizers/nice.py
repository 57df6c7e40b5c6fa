"""NICE: noise injection and clamping estimation (Baskin, Liss, Chai, Zheltonozhskii, Schwartz, Giryes, Mendelson,
Bronstein, 2018, arXiv 1810.00162, "NICE: noise injection and clamping estimation for neural network quantization").

Canonical code: LsNatan/NICE (the authors'), ``quantize.py`` (weights), ``actquant.py`` (``ActQuantBuffers``) and
``uniq.py`` (``UNIQNet``: the stages). What quantbench ports:

* weights: a fixed clamp ``c = |mean +- 3.45 std|`` (``basic_clamp``, UNIQNet's ``std_weight_clamp``; the sign of
  the mean picks +-), symmetric levels ``-M..M`` times ``c / M``, ``M = 2^(b-1) - 1``; the gradient passes straight
  through (the code swaps the quantized values into ``param.data`` for the forward and restores them after).
* noise: in the block being trained, a Bernoulli(``noise_mask`` = 0.05) fraction of the weights takes
  ``clamp(w + e, -c, c)``, ``e ~ U(-Delta/2, Delta/2)`` (``add_improved_uni_noise``: ``noise_step = 1 / (2^(b+1) -
  4)`` in units of the range ``2c``, i.e. half a step), the rest ``Q(w)``: ``W' = (1 - mask) Q(W) + mask (W + e)``;
  the gradient passes straight through, redrawn every forward.
* activations: a learned clamp ``c``, initialized at ``mean + 5 std`` of the input (``std_act_clamp``);
  ``relu(x) - relu(x - |c|)`` then ``round(x (2^b - 1) / c) c / (2^b - 1)`` with a straight-through round, so ``c``
  gets autograd's gradient through both the clamp and the scale, as in the code.
* stages (``switch_stage``): one block per layer (the code's ``num_of_layers_each_step = 1``: a conv/linear and the
  activation quantizer after it); during the first ``stage_fraction`` of training, stage ``s`` runs blocks before
  ``s`` quantized, block ``s`` with weight noise and its activations only clamped, later blocks in full precision
  with clamped activations; after it, everything is quantized (the ResNet-18 ImageNet script: one stage per 2
  epochs for 21 stages, 42 of 120 epochs, so the default is 0.35). Evaluation is always fully quantized.

Conventions (recorded in ``options()``), where quantbench departs from the code:
* the stage comes from the training loop's ``Stage`` signal (layer index among quantized layers, in module order, and
  progress), not from epochs counted by the model; a quantizer that never receives one (evaluation, the conformance
  kit) is fully quantized. An input quantizer belongs to the previous layer's block (it quantizes that block's
  output, as the code's ``ActQuant`` after each conv); the code's option of freezing earlier blocks is not ported
  (its default keeps them training).
* first and last layers: the code keeps them in full precision (``--no-quant-edges``); quantbench's recipe quantizes
  them at 8 bits with NICE like every other method.
* activation statistics: the code gathers an EMA of the pre-ReLU input's mean and std over many batches; quantbench
  uses the quantizer's own input (post-ReLU) on the initialization batch.
* signed activations (the image input; the code has none) clamp to ``[-c, c]`` with weights' symmetric levels.
* biases and BatchNorm parameters, which the code also quantizes (16-bit BN), are left in floating point.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FINAL_STAGE, Quantizer, QuantizerError, Stage
from .integer import IntegerSpec, exact_float
from .n2uq import straight_through
from .registry import register
from .ste import round_ste

PHASES = ("quantized", "noise", "float")
MIN_CLAMP = 1e-8


def _positive(name: str, value: Any, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
            upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise QuantizerError(f"nice {name} must be a number {bound}, got {value!r}")
    return float(value)


@register("nice")
class NICE(Quantizer):
    """NICE (Baskin et al. 2018): fixed weight clamp with noise injection, learned activation clamp, staged blocks."""

    stochastic = True  # weight noise in training: the conformance kit seeds the RNG before each forward

    def __init__(self, bits: int, signed: bool, role: str | None = None, noise_mask: float = 0.05,
                 weight_clamp_std: float = 3.45, act_clamp_std: float = 5.0, stage_fraction: float = 0.35) -> None:
        super().__init__(bits, signed, role)
        self.noise_mask = _positive("noise_mask", noise_mask, 1.0)
        self.weight_clamp_std = _positive("weight_clamp_std", weight_clamp_std)
        self.act_clamp_std = _positive("act_clamp_std", act_clamp_std)
        self.stage_fraction = _positive("stage_fraction", stage_fraction, 1.0)
        self.weights = self.role == "weight"
        # symmetric levels -M..M (weights, signed activations) or 0..n (unsigned activations)
        self.top = 2 ** (bits - 1) - 1 if self.signed or self.weights else 2**bits - 1
        self.bottom = -self.top if self.signed or self.weights else 0
        if self.weights:
            self.register_buffer("clamp", torch.tensor(1.0))  # fixed: computed once from the weights
        else:
            self.clamp = nn.Parameter(torch.tensor(1.0))
        self.stage = FINAL_STAGE
        self.training_phase = "quantized"

    # ---- operating point -----------------------------------------------------------------------------------------

    def initialize(self, v: Tensor) -> None:
        v = v.detach().double()
        mean = float(v.mean()) if v.numel() else 0.0
        std = float(v.std()) if v.numel() > 1 else 0.0
        if self.weights:  # basic_clamp: |mean + k std| for a positive mean, |mean - k std| otherwise
            value = abs(mean + self.weight_clamp_std * std) if mean > 0 else abs(mean - self.weight_clamp_std * std)
        else:
            value = abs(mean + self.act_clamp_std * std) if not self.signed else abs(mean) + self.act_clamp_std * std
        value = value if math.isfinite(value) else 1.0
        with torch.no_grad():
            self.clamp.fill_(max(value, MIN_CLAMP))
        self.mark_initialized()

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.clamp.fill_(step * self.top)

    # ---- stages --------------------------------------------------------------------------------------------------

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage
        # the forward reads only this string: a compiled model recompiles when the phase changes, not every step
        self.training_phase = self.phase_at(stage)

    def phase_at(self, stage: Stage) -> str:
        """What this quantizer does in training at ``stage``: quantized, noise (its block is the one being
        trained) or float."""
        if stage.progress >= self.stage_fraction:
            return "quantized"
        current = math.floor(stage.progress / self.stage_fraction * stage.layers)
        block = stage.layer - (0 if self.weights else 1)  # an input belongs to the previous layer's block
        return "quantized" if block < current else "noise" if block == current else "float"

    def phase(self) -> str:
        """What this quantizer does now (evaluation: always quantized)."""
        return self.training_phase if self.training else "quantized"

    def conformance_stages(self) -> list[tuple[str, Stage]]:
        offset = 0 if self.weights else 1
        return [("noise block", Stage(0, 1, layer=offset, layers=2 + offset)),
                ("block not reached", Stage(0, 1, layer=offset + 1, layers=2 + offset))]

    # ---- forward -------------------------------------------------------------------------------------------------

    def quantize(self, v: Tensor) -> Tensor:
        return self.quantize_weight(v) if self.weights else self.quantize_activation(v)

    def quantize_weight(self, w: Tensor) -> Tensor:
        phase = self.phase()
        if phase == "float":
            return w
        clamp = self.clamp.to(w.dtype)
        step = clamp / self.top
        clipped = torch.clamp(w.detach(), -clamp, clamp)
        quantized = torch.round(clipped / step) * step
        if phase == "noise":
            quantized = self.inject_noise(w.detach(), clamp, quantized)
        return straight_through(quantized, w)  # the code's param.data swap: gradient 1, unclipped

    def inject_noise(self, w: Tensor, clamp: Tensor, quantized: Tensor) -> Tensor:
        """``add_improved_uni_noise``, in the code's order of random draws: the weights mapped to [0, 1] over
        [-c, c], plus ``U(-1/(2^(b+1) - 4), +)`` (half a step), clamped and mapped back; then a Bernoulli(noise_mask)
        mask picks those noisy values over ``Q(w)``."""
        unit = (w + clamp) / (2 * clamp)
        half_step = 1.0 / (2 ** (self.bits + 1) - 4)
        noise = torch.empty_like(unit).uniform_(-half_step, half_step)
        noisy = torch.clamp(unit + noise, 0, 1) * (2 * clamp) - clamp
        mask = torch.bernoulli(torch.full_like(w, self.noise_mask))
        return mask * noisy + (1 - mask) * quantized

    def act_clamp(self, x: Tensor, clamp: Tensor) -> Tensor:
        if self.signed:
            return torch.minimum(torch.maximum(x, -clamp), clamp)
        return F.relu(x) - F.relu(x - clamp)  # the code's act_clamp (learned clamp gets the gradient of x > c)

    def quantize_activation(self, x: Tensor) -> Tensor:
        clamp = self.clamp.abs().clamp_min(MIN_CLAMP).to(x.dtype)
        clamped = self.act_clamp(x, clamp)
        if self.phase() != "quantized":
            return clamped  # blocks being trained or not reached: clamped, not quantized (ActQuantBuffers)
        return round_ste(clamped / clamp * self.top) * (clamp / self.top)

    # ---- interface -----------------------------------------------------------------------------------------------

    def effective_clamp(self) -> Tensor:
        return self.clamp.detach().abs().clamp_min(MIN_CLAMP)

    def levels(self) -> Tensor:
        codes = torch.arange(self.bottom, self.top + 1, dtype=self.clamp.dtype, device=self.clamp.device)
        return codes * (self.effective_clamp() / self.top)

    def current_step(self) -> float:
        return float(self.effective_clamp() / self.top)

    def range_parameters(self) -> dict[str, nn.Parameter]:
        return {} if self.weights else {"clamp": self.clamp}

    def integer_spec(self) -> IntegerSpec:
        if self.weights:
            return super().integer_spec()
        clamp = self.effective_clamp()
        # codes round(clamp(x) / c * n), as the forward computes them; output code * (c / n)
        return IntegerSpec(exact_float(clamp / self.top), self.bottom, self.top, width=exact_float(clamp),
                           multiplier=float(self.top))

    def conventions(self) -> dict[str, Any]:
        if self.weights:
            return {"weights": "fixed clamp |mean +- k std|, levels -M..M, M = 2^(b-1) - 1, straight-through",
                    "noise": "Bernoulli(noise_mask) weights take clamp(w + U(-step/2, step/2)) in the current block",
                    "stages": "one block per quantized layer over the first stage_fraction of training"}
        return {"activations": "learned clamp init mean + k std (own input, init batch), relu(x) - relu(x - c), "
                               "round with a straight-through estimator",
                "stages": "clamped only until the previous layer's block is quantized"}
