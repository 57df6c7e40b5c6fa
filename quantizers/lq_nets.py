"""LQ-Nets: learned quantization (Zhang, Yang, Ye, Hua, ECCV 2018, "LQ-Nets: learned quantization for highly accurate
and compact deep neural networks").

Canonical code: microsoft/LQ-Nets learned_quantization.py (TensorFlow; ``QuantizedWeight`` and ``QuantizedActiv``).
A K-bit quantizer (K = bits) has a basis ``v`` in R^K and the 2^K levels ``v . e`` for every code ``e``: e in {-1, +1}^K
for weights, e in {0, 1}^K for (post-ReLU) activations. The levels are sorted; an input maps to the level of its cell
between consecutive midpoints (``x > threshold_i`` moves it up, so a value exactly on a midpoint takes the lower
level). The basis is not learned by gradients: each training step, with every element assigned its code ``B``, the
least-squares basis ``(B^T B + delta I)^-1 (B^T x + delta v)`` is computed and the basis becomes its moving average
with factor 0.9 (the code's ``MOVING_AVERAGES_FACTOR``, ``EPS = 1e-4``), zero-debiased as TensorFlow's
``assign_moving_average`` (default ``zero_debias=True``) does it: ``a <- 0.9 a + 0.1 v_new`` from ``a = 0``, and
``v = a / (1 - 0.9^t)`` after t updates, so the first update sets the basis to the fit itself and the initial basis
stops counting. quantbench runs that
update in ``after_step`` (after the optimizer step, under no_grad) from the statistics of the step's training
forward(s): per cell, its count and the sum of its inputs, which give ``B^T B`` and ``B^T x`` exactly.
Weights have one basis per output channel (axis 0; the code's last axis), activations one per layer. Gradients:
weights straight through (``y = x``); activations ``y = min(x, top level)`` (the code's ``x_clip``), 0 above.

Conventions (recorded in ``options()``), where quantbench departs from the code:
* init from data: weights ``v_j = 2^j * 0.6745 std(w) / 2^(K-1)`` (the code's rule, with the weights' measured
  standard deviation in place of He init's sqrt(2/n), which it assumes); unsigned activations ``v_i = 2^i * 2 * 0.6745
  u / (2^K - 1)`` with ``u = sqrt(2 mean(x^2))``, which is 1 for ReLU of unit-variance inputs, where it equals the
  code's constant; signed activations (the image input; the code has none) use weights' {-1, +1} codes and rule with
  the input's std, one basis, clipped at both ends.
* ``init_fits`` (default 0, the code): that many least-squares fits of the basis on the init data, without the
  moving average, before training; the code's init clips at about 1.35 std at every bit width and relies on many
  training steps of updates to widen it, which a short fine-tune does not have.
* ``zero_debias`` (default True, the code's TensorFlow default); False: a plain ``v <- 0.9 v + 0.1 v_new`` from the
  initial basis (9-24% away from the fit after one step, up to 36% after five).
* ``ridge`` (delta, default the code's 1e-4) regularizes activations too (the code's activation update has none and
  would fail on a batch that never sets one bit); with counts in the thousands it changes nothing else.
* data parallel: each step's counts and sums are all-reduced before the update, so every rank fits the global batch
  (the code updates from its main training tower alone); rank 0's basis is then broadcast by the loop anyway.
* ``set_step(s)`` places a uniform grid of spacing s: ``v_i = s 2^i`` (unsigned: levels 0..(2^K-1) s) or
  ``v_i = s 2^(i-1)`` (signed: levels at odd multiples of s/2, no zero).
* integer export: refused (non-uniform learned levels, one basis per weight channel).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Quantizer, QuantizerError
from .lsq import check_bool
from .registry import register
from .n2uq import straight_through
from .ste import tape_active

NORM_PPF_0_75 = 0.6745  # the code's constant: the 0.75 quantile of the standard normal


def code_table(bits: int, signed: bool, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
    """(2^K, K): row i holds the bits of i, least significant first, as {0, 1} or (signed) {-1, +1}."""
    index = torch.arange(2**bits, device=device).reshape(-1, 1)
    bits_of = ((index >> torch.arange(bits, device=device)) & 1).to(dtype)
    return 2 * bits_of - 1 if signed else bits_of


@register("lq_nets")
class LQNets(Quantizer):
    """LQ-Nets (Zhang et al. 2018): levels v.e from a basis fitted by least squares every step, outside autograd."""

    def __init__(self, bits: int, signed: bool, role: str | None = None, momentum: float = 0.9, ridge: float = 1e-4,
                 per_channel: bool = True, init_fits: int = 0, zero_debias: bool = True) -> None:
        super().__init__(bits, signed, role)
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise QuantizerError(f"lq_nets momentum must be in [0, 1) (the code's 0.9), got {momentum!r}")
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise QuantizerError(f"lq_nets ridge must be a finite number >= 0 (the code's 1e-4), got {ridge!r}")
        if isinstance(init_fits, bool) or not isinstance(init_fits, int) or init_fits < 0:
            raise QuantizerError(f"lq_nets init_fits must be an integer >= 0 (0: the code's init alone), got {init_fits!r}")
        self.momentum, self.ridge, self.init_fits = float(momentum), float(ridge), init_fits
        self.weights = self.role == "weight"
        self.per_channel = check_bool("lq_nets", "per_channel", per_channel) and self.weights
        self.symmetric_codes = self.weights or self.signed  # {-1, +1}^K; unsigned activations {0, 1}^K
        self.zero_debias = check_bool("lq_nets", "zero_debias", zero_debias)
        self.register_buffer("basis", torch.ones(1, bits))
        # TensorFlow's zero-debiased moving average: the biased average (from 0) and the number of updates
        self.register_buffer("average", torch.zeros(1, bits))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self._stats: tuple[Tensor, Tensor] | None = None  # per channel: count and input sum of every code (training)

    # ---- state ---------------------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        saved = state_dict.get(prefix + "basis")
        if saved is not None and saved.shape != self.basis.shape:
            self.basis = torch.empty_like(saved, dtype=self.basis.dtype, device=self.basis.device)
            self.average = torch.zeros_like(self.basis)
        if prefix + "basis" in state_dict and prefix + "average" not in state_dict:  # saved before zero_debias
            state_dict[prefix + "average"] = torch.zeros_like(self.basis)
            state_dict[prefix + "updates"] = torch.zeros((), dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def initialize(self, v: Tensor) -> None:
        v = v.detach().double()
        k = self.bits
        if self.symmetric_codes:
            rows = v.reshape(v.shape[0], -1) if self._channels(v) else v.reshape(1, -1)
            std = float(v.std()) if v.numel() > 1 else float(v.abs().mean())
            base = NORM_PPF_0_75 * _finite_floor(std) / 2 ** (k - 1)
            channels = rows.shape[0]
        else:
            unit = _finite_floor(math.sqrt(2 * float((v * v).mean()))) if v.numel() else 1.0
            base = NORM_PPF_0_75 * 2 * unit / (2**k - 1)
            channels = 1
        powers = 2.0 ** torch.arange(k, dtype=torch.float64)
        self.basis = (base * powers).repeat(channels, 1).to(self.basis.dtype).to(self.basis.device)
        rows = v.reshape(channels, -1).to(self.basis.dtype)
        for _ in range(self.init_fits):  # optional: least-squares fits on the init data, no averaging
            levels, order = self.sorted_levels()
            cell = torch.searchsorted(((levels[:, 1:] + levels[:, :-1]) / 2).contiguous(), rows.contiguous())
            counts, sums = self._statistics(order.gather(1, cell), rows)
            self.basis.copy_(self.fitted_basis(counts, sums, momentum=0.0).to(self.basis.dtype))
        self._restart_average()
        self.mark_initialized()

    def _restart_average(self) -> None:
        self.average = torch.zeros_like(self.basis)
        self.updates.zero_()

    def apply_step(self, step: float) -> None:
        powers = 2.0 ** torch.arange(self.bits, dtype=torch.float64)
        unit = step / 2 if self.symmetric_codes else step
        self.basis.copy_((unit * powers).to(self.basis).expand_as(self.basis))
        self._restart_average()

    def _channels(self, v: Tensor) -> int:
        return v.shape[0] if self.per_channel and v.dim() >= 2 else 0

    # ---- forward -------------------------------------------------------------------------------------------------

    def sorted_levels(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(sorted levels, the code index of each) per basis row: (C, 2^K) each."""
        basis = self.basis.detach() if dtype is None else self.basis.detach().to(dtype)
        table = code_table(self.bits, self.symmetric_codes, basis.dtype, basis.device)
        return torch.sort(basis @ table.T, dim=1)

    def quantize(self, v: Tensor) -> Tensor:
        channels = self._channels(v)
        rows = v.reshape(channels, -1) if channels else v.reshape(1, -1)
        if rows.shape[0] != self.basis.shape[0]:
            raise QuantizerError(
                f"lq_nets has {self.basis.shape[0]} channel bases but got a tensor with {rows.shape[0]} channel(s) "
                f"(shape {tuple(v.shape)}); use one quantizer per layer"
            )
        levels, order = self.sorted_levels(v.dtype)
        thresholds = (levels[:, 1:] + levels[:, :-1]) / 2
        cell = torch.searchsorted(thresholds.contiguous(), rows.detach().contiguous())  # thresholds below x
        quantized = levels.gather(1, cell)
        if self.training and torch.is_grad_enabled() and not tape_active():
            self._record(order.gather(1, cell), rows.detach())
        if self.weights:
            passed = rows  # straight through, unclipped (the code's y = x)
        elif self.signed:
            passed = torch.clamp(rows, levels[:, :1], levels[:, -1:])
        else:
            passed = torch.clamp(rows, max=levels[:, -1:])  # the code's x_clip = min(x, top level)
        return straight_through(quantized, passed).reshape(v.shape)  # exactly the level, gradient of `passed`

    def _statistics(self, codes: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Per channel and code: how many inputs took it and their sum (B^T B and B^T x follow exactly)."""
        counts = torch.zeros(rows.shape[0], 2**self.bits, dtype=torch.float64, device=rows.device)
        sums = torch.zeros_like(counts)
        counts.scatter_add_(1, codes, torch.ones_like(rows, dtype=torch.float64))
        sums.scatter_add_(1, codes, rows.double())
        return counts, sums

    def _record(self, codes: Tensor, rows: Tensor) -> None:
        counts, sums = self._statistics(codes, rows)
        if self._stats is not None and self._stats[0].shape == counts.shape:
            counts, sums = counts + self._stats[0], sums + self._stats[1]
        self._stats = (counts, sums)

    # ---- the basis update (training loop hook) -------------------------------------------------------------------

    def after_step(self, step: int) -> None:
        """Least-squares basis from this step's codes, then the moving average (the code's update op)."""
        if self._stats is None:
            return
        counts, sums = self._stats
        self._stats = None
        distributed = torch.distributed
        if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
            distributed.all_reduce(counts)
            distributed.all_reduce(sums)
        if not self.zero_debias:
            self.basis.copy_(self.fitted_basis(counts, sums).to(self.basis.dtype))
            return
        fit = self.fitted_basis(counts, sums, momentum=0.0)
        average = self.momentum * self.average.double() + (1 - self.momentum) * fit
        self.updates += 1
        self.average.copy_(average.to(self.average.dtype))
        self.basis.copy_((average / (1 - self.momentum ** int(self.updates))).to(self.basis.dtype))

    def fitted_basis(self, counts: Tensor, sums: Tensor, momentum: float | None = None) -> Tensor:
        """The moving average of the basis towards the ridge least-squares fit of the given code statistics."""
        momentum = self.momentum if momentum is None else momentum
        table = code_table(self.bits, self.symmetric_codes, torch.float64, counts.device)
        basis = self.basis.detach().double()
        gram = torch.einsum("cl,lk,lj->ckj", counts, table, table)
        gram = gram + self.ridge * torch.eye(self.bits, dtype=torch.float64, device=counts.device)
        target = sums @ table + self.ridge * basis
        fitted = torch.linalg.lstsq(gram, target.unsqueeze(-1)).solution.squeeze(-1)
        fitted = torch.where(torch.isfinite(fitted).all(dim=1, keepdim=True), fitted, basis)
        return momentum * basis + (1 - momentum) * fitted

    # ---- interface -----------------------------------------------------------------------------------------------

    def levels(self) -> Tensor:
        levels, _ = self.sorted_levels()
        return torch.unique(levels.reshape(-1))

    def current_step(self) -> float:
        levels, _ = self.sorted_levels()
        return float(((levels[:, -1] - levels[:, 0]) / (2**self.bits - 1)).mean())

    def range_parameters(self) -> dict:
        return {}  # the basis is fitted, not learned by gradients

    def integer_spec(self):  # type: ignore[override]
        raise QuantizerError(
            "quantizer 'lq_nets' has non-uniform learned levels (v . e for a fitted basis, one per weight channel): "
            "quantbench's integer layers need a uniform grid; keep it in fake-quantized form"
        )

    def conventions(self) -> dict[str, Any]:
        return {
            "codes": "{-1,+1}^K" if self.symmetric_codes else "{0,1}^K",
            "basis_update": "after_step: ridge least squares on the step's codes, moving average "
            + ("zero-debiased as TensorFlow's (the code)" if self.zero_debias else "from the initial basis")
            + " (all-reduced under DDP)",
            "gradient": "straight through" if self.weights else "min(x, top level)" if not self.signed
            else "clip(x, lowest, top level)",
            "init": "0.6745 std 2^j / 2^(K-1)" if self.symmetric_codes else "0.6745 * 2 sqrt(2 mean x^2) 2^i / (2^K - 1)",
        }


def _finite_floor(value: float, eps: float = 1e-8) -> float:
    """``value`` when finite and above ``eps``; ``eps`` for zero-like data, 1 for non-finite statistics."""
    if not math.isfinite(value):
        return 1.0
    return max(value, eps)
