"""LSQ section 3.6: does the learned step minimize quantization error?

For every quantized layer of a trained run, and each of its two quantized tensors (the weights, and the layer's input
on one batch of test data, captured before quantization), evaluate the quantization error of the uniform quantizer
``v_hat(s) = clamp(round(v/s), -Q_N, Q_P) * s`` at every ``s`` in ``S = {0.01, 0.02, ..., 20.00} * s_hat`` (``s_hat``
the learned step) for three metrics, and report the minimizing step of each and its percent absolute difference
``100 |s* - s_hat| / s_hat``, per layer and averaged over weight layers and activation layers, as in the paper.

Metrics (``v`` the sample, N its size):

* ``mae`` = mean |v_hat(s) - v|, ``mse`` = mean (v_hat(s) - v)^2, over the whole sample;
* ``kl``: the paper drops the s-independent term of KL(p || q) and approximates the rest as -E[log q(v_hat(s))] over
  the sample. Here ``q`` is the distribution of ``v_hat(s)`` written as a density on v's axis: the probability
  ``P_j = n_j / N`` of code ``j`` spread uniformly over the inputs that quantize to it, i.e. over its rounding cell
  ``[(j - 1/2) s, (j + 1/2) s)`` (the two end codes' cells extend to -inf / +inf and take in the clipped values),
  intersected with the sample's range ``[min v, max v]``; so ``q(v_hat_j) = P_j / w_j`` and the reported value is
  ``-sum_j P_j log(P_j / w_j)`` (nats). Evaluating q at v_hat or at v is the same thing, since q is constant on a cell,
  and q is a proper density on [min v, max v], so KL(p || q) >= 0: a histogram of v with the quantizer's own cells.
  Cell widths are floored at (max v - min v) / N (one sample's share of the range) so a cell holding a lone extreme
  sample cannot make q spike. The density is estimated on the **non-zero** samples only: exact zeros (after a ReLU,
  often half the activations) are a point mass that every candidate step represents exactly and that no density
  can, and that would otherwise reward s -> 0 (other repeated values, e.g. the constant response of a channel to
  an image's uniform background, are kept). A sample whose non-zero values are mostly repeats (fewer distinct
  values than half their number) of at most 4 distinct values per quantizer level is discrete (image pixels take
  256 values) and has no density: its KL is not estimated (NaN).

  Caveat: the paper does not say how it estimated q. The two literal readings are degenerate and therefore not
  used: q = the probability mass of each code gives -E[log q] = H(codes), minimized by the largest step (every value
  in one code); q = the mass divided by the nominal step gives H(codes) + log s, minimized by the smallest step.
  ``kl_literal_pmf`` / ``kl_literal_density`` in ``curves.csv`` record both so this can be checked.

The errors are computed exactly for all 2000 steps at once from the sorted sample and its prefix sums (each step needs
only the positions of the 2^b - 1 cell edges and 2^b levels, found by binary search), in float64. The quantizer's own
forward is used to check the grid: at the learned step, and at three other candidate steps placed with ``set_step`` on a
copy, it must agree with the formula above (QuantbenchError otherwise: the analysis is for uniform-step quantizers,
such as lsq and fixed; PACT's clip quantizer and QIL at gamma = 1 also pass).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

import quantizers
from quantbench.errors import QuantbenchError
from quantbench.training.rebuild import LoadedRun, first_test_batch, load_run
from quantbench.utils.modules import capture_inputs
from quantbench.qat import quantized_layers

METRICS = ("mae", "mse", "kl")
#: a sample whose non-zero values are mostly repeats of at most this many distinct values per quantizer level is
#: discrete (image pixels): no KL
DISCRETE_FACTOR = 4
METRIC_NAMES = {"mae": "mean absolute error", "mse": "mean squared error", "kl": "KL divergence (cross-entropy term)"}
#: the paper's candidate set: {0.01, 0.02, ..., 20.00} x the learned step
RATIOS = torch.arange(1, 2001, dtype=torch.float64) / 100
#: the paper's averages (2-bit ResNet-18 on ImageNet), percent absolute difference
PAPER = {("activation", "mae"): 50, ("activation", "mse"): 63, ("activation", "kl"): 64,
         ("weight", "mae"): 47, ("weight", "mse"): 28, ("weight", "kl"): 46}


@dataclass
class Sample:
    """One quantized tensor of one layer: its values, its quantizer's learned step and integer code range."""

    layer: str
    kind: str  # "weight" or "activation"
    bits: int
    quantizer: str
    values: Tensor
    step: float
    lo: int
    hi: int


# ---- the grid and its check -------------------------------------------------------------------------------------


def _grid_values(values: Tensor, step: float, lo: int, hi: int) -> Tensor:
    return torch.clamp(torch.round(values / step), lo, hi) * step


def code_range(quantizer: quantizers.Quantizer, step: float, where: str) -> tuple[float, int, int]:
    """The step and integer code range of a uniform-step quantizer, read from ``levels()``.

    ``step`` (``current_step()``) is kept when the levels are integer multiples of it; otherwise (a step recovered
    from float32 level gaps) the span of the levels over their count is used.
    """
    levels = quantizer.levels().detach().double().flatten().sort().values
    if levels.numel() >= 2:
        for candidate in (step, float(levels[-1] - levels[0]) / (levels.numel() - 1)):
            codes = levels / candidate
            if float((codes - codes.round()).abs().max()) < 1e-3 and \
                    levels.numel() == int(codes.round().max() - codes.round().min()) + 1:
                return candidate, int(codes.round().min()), int(codes.round().max())
    raise QuantbenchError(
        f"{where}: quantizer '{quantizer.registry_name}' is not a uniform grid of integer multiples of one step "
        "(qerror evaluates uniform-step quantizers such as lsq and fixed)"
    )


def check_grid(quantizer: quantizers.Quantizer, values: Tensor, step: float, lo: int, hi: int, where: str) -> None:
    """The quantizer's own forward must be ``clamp(round(v/s), lo, hi) * s`` at its learned step and, placed with
    ``set_step`` on a copy, at other candidate steps (float32 ties at the cell edges excepted)."""
    candidates = [(quantizer, step)]
    for ratio in (0.37, 2.9, 11.3):
        placed = copy.deepcopy(quantizer)
        placed.set_step(step * ratio)
        candidates.append((placed, placed.current_step()))
    with torch.no_grad():
        for candidate, s in candidates:
            out = candidate(values).double()
            expected = _grid_values(values.double(), s, lo, hi)
            wrong = int(((out - expected).abs() > 1e-4 * s).sum())
            if wrong > max(1, values.numel() // 10_000):
                raise QuantbenchError(
                    f"{where}: quantizer '{quantizer.registry_name}' at step {s:.4g} does not quantize as "
                    f"clamp(round(v/s), {lo}, {hi}) * s ({wrong} of {values.numel()} values differ); qerror evaluates "
                    "uniform-step quantizers (lsq, fixed; QIL only at gamma = 1)"
                )


# ---- the errors -------------------------------------------------------------------------------------------------


def error_curves(values: Tensor, step: float, lo: int, hi: int, ratios: Tensor = RATIOS) -> dict[str, Tensor]:
    """MAE, MSE and the KL cross-entropy term (module docstring) at each ``ratios * step``, exactly, in float64."""
    x = values.detach().flatten().double().sort().values
    n = x.numel()
    steps = ratios.double() * step
    codes = torch.arange(lo, hi + 1, dtype=torch.float64)
    levels = steps[:, None] * codes[None]
    edges = (steps[:, None] * (codes[:-1] + 0.5)[None]).contiguous()
    out = {"ratio": ratios.double(), "step": steps}

    zero = x.new_zeros(1)
    c1 = torch.cat([zero, x.cumsum(0)])
    c2 = torch.cat([zero, (x * x).cumsum(0)])
    inner = torch.searchsorted(x, edges)  # values below each cell edge
    start = torch.cat([torch.zeros_like(inner[:, :1]), inner], 1)
    end = torch.cat([inner, torch.full_like(inner[:, :1], n)], 1)
    middle = torch.searchsorted(x, levels.contiguous()).clamp(start, end)
    count = (end - start).double()
    s1, s2 = c1[end] - c1[start], c2[end] - c2[start]
    out["mse"] = ((s2 - 2 * levels * s1 + levels**2 * count).clamp_min(0).sum(1) / n)
    below, above = (middle - start).double(), (end - middle).double()
    out["mae"] = (levels * below - (c1[middle] - c1[start]) + (c1[end] - c1[middle]) - levels * above).clamp_min(0).sum(1) / n

    nonzero = x[x != 0]
    m = nonzero.numel()
    probabilities = None
    distinct = torch.unique_consecutive(nonzero).numel() if m else 0
    if m >= 2 and not (distinct <= DISCRETE_FACTOR * (hi - lo + 1) and distinct < m / 2):
        cut = torch.searchsorted(nonzero, edges)
        lower = torch.cat([torch.zeros_like(cut[:, :1]), cut], 1)
        upper = torch.cat([cut, torch.full_like(cut[:, :1], m)], 1)
        probabilities = (upper - lower).double() / m
        low, high = float(nonzero[0]), float(nonzero[-1])
        left = torch.cat([torch.full_like(edges[:, :1], low), edges.clamp(low, high)], 1)
        right = torch.cat([edges.clamp(low, high), torch.full_like(edges[:, :1], high)], 1)
        widths = (right - left).clamp_min((high - low) / m)
        logp = torch.where(probabilities > 0, probabilities.clamp_min(1e-300).log(), 0.0)
        entropy = -(probabilities * logp).sum(1)
        out["kl"] = entropy + (probabilities * widths.log()).sum(1)
        out["kl_literal_pmf"] = entropy
        out["kl_literal_density"] = entropy + steps.log()
    else:
        nan = torch.full_like(steps, float("nan"))
        out["kl"] = out["kl_literal_pmf"] = out["kl_literal_density"] = nan
    return out


# ---- collecting the samples ---------------------------------------------------------------------------------------


def collect_samples(run: LoadedRun, batch_size: int = 256) -> tuple[list[Sample], int]:
    """Weights and (on the first ``batch_size`` test images) inputs of every quantized layer, with their steps."""
    images, _ = first_test_batch(run.data, batch_size)
    layers = quantized_layers(run.model)
    if not layers:
        raise QuantbenchError(f"{run.directory}: the model has no quantized layer")
    inputs = capture_inputs(run.model, dict(layers), images)
    samples = []
    for name, layer in layers:
        for kind, quantizer, values in (("weight", layer.weight_quantizer, layer.weight.detach()),
                                        ("activation", layer.input_quantizer, inputs.get(name))):
            if quantizer is None or values is None:
                continue
            where = f"layer {name} ({kind})"
            step, lo, hi = code_range(quantizer, float(quantizer.current_step()), where)
            check_grid(quantizer, values, step, lo, hi, where)
            samples.append(Sample(name, kind, quantizer.bits, quantizer.registry_name, values, step, lo, hi))
    return samples, int(images.shape[0])


# ---- the analysis -------------------------------------------------------------------------------------------------


@dataclass
class QErrorResult:
    curves: pd.DataFrame  # one row per (layer, kind, ratio)
    summary: pd.DataFrame  # one row per (layer, kind, metric)
    averages: pd.DataFrame  # one row per (layers, kind, metric)
    info: dict[str, Any]


def analyze(run_dir: str | Path, batch_size: int = 256, data_dir: str | None = None) -> QErrorResult:
    started = time.perf_counter()
    run = load_run(run_dir, data_dir)
    samples, images = collect_samples(run, batch_size)
    loaded = time.perf_counter() - started
    frames, rows = [], []
    for sample in samples:
        curves = error_curves(sample.values, sample.step, sample.lo, sample.hi)
        frame = pd.DataFrame({key: value.numpy() for key, value in curves.items()})
        frame.insert(0, "kind", sample.kind)
        frame.insert(0, "layer", sample.layer)
        frames.append(frame)
        at_learned = frame.loc[(frame["ratio"] - 1.0).abs().idxmin()]
        for metric in METRICS:
            column = frame[metric]
            if column.isna().all():
                best_ratio = best_step = pct = float("nan")
                best_value = float("nan")
            else:
                best = int(column.to_numpy().argmin())  # first minimum: the smallest minimizing step
                best_ratio = float(frame["ratio"].iloc[best])
                best_step = float(frame["step"].iloc[best])
                best_value = float(column.iloc[best])
                pct = 100.0 * abs(best_ratio - 1.0)
            rows.append({
                "layer": sample.layer, "kind": sample.kind, "bits": sample.bits, "quantizer": sample.quantizer,
                "elements": sample.values.numel(), "zero_fraction": float((sample.values == 0).double().mean()),
                "learned_step": sample.step, "metric": metric, "best_step": best_step, "best_ratio": best_ratio,
                "pct_abs_diff": pct, "error_at_learned": float(at_learned[metric]), "error_at_best": best_value,
            })
    summary = pd.DataFrame(rows)
    summary.insert(summary.columns.get_loc("learned_step") + 1, "initial_step", _initial_steps(run, summary))
    run_bits = run.config.bits
    averages = []
    for scope, frame in (("run bits", summary[summary["bits"] == run_bits]), ("all quantized", summary)):
        for (kind, metric), group in frame.groupby(["kind", "metric"], sort=False):
            values = group["pct_abs_diff"].dropna()
            averages.append({"layers": f"{run_bits}-bit layers" if scope == "run bits" else "all quantized layers",
                             "kind": kind, "metric": metric, "n_layers": int(values.size),
                             "mean_pct_abs_diff": float(values.mean()) if values.size else float("nan"),
                             "paper": PAPER.get((kind, metric))})
    info = {
        "run_dir": str(run_dir), "dataset": run.config.dataset, "model": run.config.model,
        "quantizer": run.config.quantizer, "bits": run_bits, "first_last_bits": run.config.first_last_bits,
        "batch_size": images, "candidates": int(RATIOS.numel()), "load_seconds": loaded,
        "seconds": time.perf_counter() - started,
    }
    return QErrorResult(pd.concat(frames, ignore_index=True), summary, pd.DataFrame(averages), info)


def _initial_steps(run: LoadedRun, summary: pd.DataFrame) -> list[float]:
    """Each step at initialization, from the run's ``layers.csv`` (written after the first forward pass, before the
    first update); NaN when the run has none."""
    path = run.directory / "layers.csv"
    table = pd.read_csv(path).set_index("layer") if path.is_file() else pd.DataFrame()
    steps = []
    for layer, kind in zip(summary["layer"], summary["kind"]):
        column = f"{kind}_step"
        value = table.at[layer, column] if layer in table.index and column in table.columns else float("nan")
        steps.append(float(value) if value == value else float("nan"))
    return steps
