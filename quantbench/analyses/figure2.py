"""LSQ's Figure 2 drawn from each quantizer's own autograd (``quantbench fig2``).

Esser et al. (ICLR 2020), Figure 2: "A) quantizer output and B) gradients of the quantizer output with respect to step
size, s, for LSQ, or a related parameter controlling the width of the quantized domain (equal to s(Q_P + Q_N)) for QIL
and PACT." Here every curve comes from the code that trains, with no per-quantizer formula:

1. each selected quantizer is built fresh (``quantizers.create``), cast to float64 and placed at the same operating
   point with ``set_step(s)`` (LSQ: step s; QIL: pruning point 0 and clipping point Q_P*s; PACT: alpha = Q_P*s);
2. one forward pass over a dense grid of v (a leaf tensor of N points);
3. batched backward passes (``torch.autograd.grad(..., is_grads_batched=True)`` over rows of the identity) give, for
   every point i, d output_i / d v_i (panel C) and d output_i / d p, where p is the quantizer's *primary* range
   parameter, the first entry of ``range_parameters()`` (LSQ: step_size; QIL: distance, the half-width with the
   center held fixed; PACT: alpha). A quantizer whose Function cannot run batched falls back to one pass per point.

Conventions (written into the figure's caption and the CSV):

* Options: :data:`FIGURE2_OPTIONS` reproduces the paper: LSQ's *unscaled* step gradient (eq. 3, ``grad_scale="none"``;
  with the training default g = 1/sqrt(N*Q_P) the curve would depend on the number of grid points) and QIL's
  normalized output x_bar in [0, 1] (``output_scale="normalized"``; quantbench's training default multiplies by the
  clipping point, which would triple panel B). Users override them per quantizer (``--set lsq.grad_scale=full``).
* Panel A overlays every method at v's scale, as the paper does ("for QIL this means 3*x_bar"): a quantizer whose
  output grid spacing (``current_step()``) is not s is multiplied by s / current_step() for the plot. The CSV keeps the
  raw ``output``, the ``plot_scale`` and the plotted ``output_plotted``. Panels B and C are raw autograd values.
* A quantizer that learns nothing (``fixed``; PACT's DoReFa weights) has ``param_name = "none (not learned)"`` and an
  empty ``grad_param``: it is drawn in panels A and C and named in a note in panel B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from quantbench.utils.plotting import save_reproducible
from quantbench.utils.io import write_csv, write_json
import quantizers
from quantizers import Quantizer, QuantizerError

#: Options that make each built-in quantizer plot what the paper plots (see the module docstring).
FIGURE2_OPTIONS: dict[str, dict[str, Any]] = {"lsq": {"grad_scale": "none"}, "qil": {"output_scale": "normalized"}}
DEFAULT_QUANTIZERS = ("lsq", "qil", "pact")
DEFAULT_POINTS = 2001
MAX_POINTS = 20001  # the per-point derivatives cost O(points^2) (rows of the identity), so bound it
NO_PARAMETER = "none (not learned)"
CSV_COLUMNS = [
    "quantizer",
    "v",
    "output",
    "output_plotted",
    "plot_scale",
    "grad_param",
    "grad_input",
    "param_name",
    "bits",
    "signed",
    "step",
    "qn",
    "qp",
    "label",
]
_BATCH_VALUES = 8_000_000  # identity rows per batched backward are bounded so a chunk holds at most this many values


def default_stem(bits: int, signed: bool) -> str:
    """``figure2`` for the paper's 2-bit unsigned case, else ``figure2-<b>bit-<signed|unsigned>``."""
    if bits == 2 and not signed:
        return "figure2"
    return f"figure2-{bits}bit-{'signed' if signed else 'unsigned'}"


def default_range(bits: int, signed: bool, step: float) -> tuple[float, float]:
    """One step beyond the clip points: [0, (Q_P+1)s] unsigned (the paper's [0, 4]), [-(Q_N+1)s, (Q_P+1)s] signed."""
    reference = Quantizer(bits, signed)  # validates bits; Q_N, Q_P are fixed by bits and sign
    return (-(reference.qn + 1) * step if signed else 0.0, (reference.qp + 1) * step)


def figure_options(names: Iterable[str], overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict]:
    """The options each quantizer is built with: :data:`FIGURE2_OPTIONS` for the selected names, then ``overrides``."""
    names = list(names)
    unknown = sorted(set(overrides or {}) - set(names))
    if unknown:
        raise QuantizerError(
            f"--set names quantizer {', '.join(map(repr, unknown))}, which is not in --quantizers ({', '.join(names)})"
        )
    options = {name: dict(FIGURE2_OPTIONS.get(name, {})) for name in names}
    for name, settings in (overrides or {}).items():
        options[name].update(settings)
    return options


def _primary_parameter(quantizer: Quantizer) -> tuple[str, torch.nn.Parameter | None]:
    parameters = quantizer.range_parameters()
    if not parameters:
        return NO_PARAMETER, None
    name, parameter = next(iter(parameters.items()))
    if parameter.numel() != 1:
        name = f"{name} (sum over its {parameter.numel()} elements)"
    return name, parameter


def _batched_curves(
    quantizer: Quantizer, v: torch.Tensor, parameter: torch.nn.Parameter | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over all of ``v``; per-point derivatives by batched backward passes over identity rows."""
    v = v.detach().clone().requires_grad_(True)
    output = quantizer(v)
    if output.shape != v.shape:
        raise QuantizerError(f"quantizer returned shape {tuple(output.shape)} for input shape {tuple(v.shape)}")
    n = v.numel()
    grad_input = torch.zeros(n, dtype=v.dtype)
    grad_param = torch.zeros(n, dtype=v.dtype)
    if output.requires_grad:
        inputs = [v] + ([parameter] if parameter is not None else [])
        chunk = max(1, min(n, _BATCH_VALUES // n))
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk))
            basis = torch.zeros(rows.numel(), n, dtype=output.dtype)
            basis[rows - start, rows] = 1.0
            grads = torch.autograd.grad(
                output, inputs, grad_outputs=basis, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            if grads[0] is not None:
                grad_input[rows] = grads[0][rows - start, rows].detach()
            if parameter is not None and grads[1] is not None:
                grad_param[rows] = grads[1].detach().reshape(rows.numel(), -1).sum(dim=1)
    return output.detach(), grad_input, grad_param


def _pointwise_curves(
    quantizer: Quantizer, v: torch.Tensor, parameter: torch.nn.Parameter | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fallback: one forward and backward per point (a 1-element tensor each)."""
    outputs, grad_input, grad_param = (torch.zeros(v.numel(), dtype=v.dtype) for _ in range(3))
    for index, value in enumerate(v.detach()):
        point = value.reshape(1).clone().requires_grad_(True)
        output = quantizer(point)
        outputs[index] = output.detach().reshape(())
        if output.requires_grad:
            inputs = [point] + ([parameter] if parameter is not None else [])
            grads = torch.autograd.grad(output.sum(), inputs, allow_unused=True)
            if grads[0] is not None:
                grad_input[index] = grads[0].reshape(())
            if parameter is not None and grads[1] is not None:
                grad_param[index] = grads[1].sum()
    return outputs, grad_input, grad_param


def quantizer_curves(
    name: str, *, bits: int, signed: bool, step: float, v: torch.Tensor, options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The Figure 2 rows of one quantizer: output and autograd derivatives at every point of ``v``."""
    quantizer = quantizers.create(name, bits=bits, signed=signed, **dict(options or {})).double()
    quantizer.set_step(step)
    param_name, parameter = _primary_parameter(quantizer)
    v = v.to(torch.float64)
    try:
        output, grad_input, grad_param = _batched_curves(quantizer, v, parameter)
    except (RuntimeError, NotImplementedError):
        # A custom autograd.Function whose backward does not run under vmap: same curves, one point at a time.
        quantizer = quantizers.create(name, bits=bits, signed=signed, **dict(options or {})).double()
        quantizer.set_step(step)
        param_name, parameter = _primary_parameter(quantizer)
        output, grad_input, grad_param = _pointwise_curves(quantizer, v, parameter)
    spacing = float(quantizer.current_step())
    plot_scale = step / spacing if math.isfinite(spacing) and spacing > 0 else 1.0
    if math.isclose(plot_scale, 1.0, rel_tol=1e-9):
        plot_scale = 1.0
    learned = parameter is not None
    label = f"{name} (d/d {param_name})" if learned else f"{name} (no learnable parameter)"
    metadata = quantizer.metadata()
    frame = pd.DataFrame(
        {
            "quantizer": name,
            "v": v.numpy(),
            "output": output.numpy(),
            "output_plotted": (output * plot_scale).numpy(),
            "plot_scale": plot_scale,
            "grad_param": grad_param.numpy() if learned else float("nan"),
            "grad_input": grad_input.numpy(),
            "param_name": param_name,
            "bits": bits,
            "signed": bool(signed),
            "step": float(step),
            "qn": metadata.get("qn", quantizer.qn),
            "qp": metadata.get("qp", quantizer.qp),
            "label": label,
        },
        columns=CSV_COLUMNS,
    )
    frame.attrs["metadata"] = metadata
    return frame


def figure2_data(
    quantizer_names: Sequence[str] = DEFAULT_QUANTIZERS,
    *,
    bits: int = 2,
    signed: bool = False,
    step: float = 1.0,
    lo: float | None = None,
    hi: float | None = None,
    points: int = DEFAULT_POINTS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Tidy Figure 2 data, one row per (quantizer, v). ``options``: per-quantizer overrides of FIGURE2_OPTIONS.

    ``lo``/``hi`` default to :func:`default_range`. Raises :class:`quantizers.QuantizerError` on bad input, before
    anything is evaluated.
    """
    names = [name.strip() for name in quantizer_names if name.strip()]
    if not names:
        raise QuantizerError("--quantizers is empty: name at least one, e.g. lsq,qil,pact")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise QuantizerError(f"--quantizers lists {', '.join(duplicates)} more than once")
    step = float(step)
    if not math.isfinite(step) or step <= 0:
        raise QuantizerError(f"--step must be a positive finite number, got {step}")
    default_lo, default_hi = default_range(bits, signed, step)
    lo = default_lo if lo is None else float(lo)
    hi = default_hi if hi is None else float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise QuantizerError(f"--range needs finite LO < HI, got {lo} {hi}")
    if isinstance(points, bool) or not isinstance(points, int) or not 2 <= points <= MAX_POINTS:
        raise QuantizerError(f"--points must be an integer in 2..{MAX_POINTS}, got {points}")
    built_with = figure_options(names, options)
    for name in names:  # fail on an unknown name or option before evaluating anything
        quantizers.create(name, bits=bits, signed=signed, **built_with[name])
    v = torch.linspace(lo, hi, points, dtype=torch.float64)
    frames = [
        quantizer_curves(name, bits=bits, signed=signed, step=step, v=v, options=built_with[name]) for name in names
    ]
    metadata = {name: frame.attrs["metadata"] for name, frame in zip(names, frames)}
    data = pd.concat(frames, ignore_index=True)
    data.attrs = {
        "figure_options": {name: settings for name, settings in built_with.items() if settings},
        "quantizers": metadata,
    }
    return data


# ---- drawing ------------------------------------------------------------------------------------------------------


def _segments(values: pd.Series, span: float) -> pd.Series:
    """Segment ids that break a curve at its jumps, so a staircase is not drawn with vertical risers."""
    if not span > 0:
        return pd.Series(0, index=values.index)
    jumps = values.diff().abs() > 0.02 * span
    return jumps.cumsum()


def caption(data: pd.DataFrame) -> str:
    """What the figure shows, in words: operating point, options, rescaling and quantizers without parameters."""
    first = data.iloc[0]
    bits, signed, step = int(first["bits"]), bool(first["signed"]), float(first["step"])
    qn, qp = int(first["qn"]), int(first["qp"])
    points = int((data["quantizer"] == first["quantizer"]).sum())
    metadata = data.attrs.get("quantizers") or {}
    roles = sorted({str(meta["role"]) for meta in metadata.values() if "role" in meta})
    role = f", role={'/'.join(roles)}" if roles else ""
    lines = [
        f"{bits}-bit {'signed' if signed else 'unsigned'}{role}, every quantizer placed by set_step(s = {step:g}) "
        f"(Q_N = {qn}, Q_P = {qp}); curves are each quantizer's own forward and autograd (float64, {points} points)."
    ]
    options = data.attrs.get("figure_options") or {}
    if options:
        described = "; ".join(
            f"{name} " + ", ".join(f"{key}={value!r}" for key, value in settings.items())
            for name, settings in options.items()
        )
        lines.append(f"Options: {described} (the paper plots unscaled gradients and QIL's normalized output).")
    scales = data.groupby("quantizer", sort=False)["plot_scale"].first()
    rescaled = ", ".join(f"{name} x{scale:g}" for name, scale in scales.items() if scale != 1.0)
    if rescaled:
        lines.append(f"Panel A shows each output at v's scale (times s / its level spacing): {rescaled}.")
    lines.append(
        "Panel B: d output / d the primary range parameter named in the legend; panels B and C are raw autograd values."
    )
    return "\n".join(lines)


def draw_figure2(data: pd.DataFrame, path_stem: str | Path, with_input_grad: bool = False) -> list[Path]:
    """Draw panels A (output), B (d output / d parameter) and optionally C (d output / dv); write .png and .svg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(data["label"]))
    palette = dict(zip(labels, sns.color_palette("colorblind", len(labels))))
    # Curves that coincide (panel A: every method has the same staircase) stay visible: earlier ones drawn wider.
    widths = {label: 1.5 + 2.5 * (len(labels) - 1 - i) / max(1, len(labels) - 1) for i, label in enumerate(labels)}
    panels = [
        ("output_plotted", "A) quantizer output", "output (at v's scale)"),
        ("grad_param", "B) d output / d (step or width parameter)", "gradient"),
    ]
    if with_input_grad:
        panels.append(("grad_input", "C) d output / dv", "gradient"))
    rc = {"svg.fonttype": "none", "svg.hashsalt": "quantbench-figure2"}  # SVG text stays searchable text
    with sns.axes_style("whitegrid"), plt.rc_context(rc):
        figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
        for ax, (column, title, ylabel) in zip(axes[0], panels):
            curves = data[data[column].notna()].copy()
            span = float(curves[column].max() - curves[column].min()) if len(curves) else 0.0
            curves["segment"] = curves.groupby("quantizer", sort=False)[column].transform(lambda s: _segments(s, span))
            if len(curves):
                sns.lineplot(
                    data=curves,
                    x="v",
                    y=column,
                    hue="label",
                    hue_order=[label for label in labels if label in set(curves["label"])],
                    palette=palette,
                    size="label",
                    sizes=widths,
                    units="segment",
                    estimator=None,
                    legend=False,
                    ax=ax,
                )
            ax.set_title(title, loc="left")
            ax.set_xlabel("v")
            ax.set_ylabel(ylabel)
            missing = [label for label in labels if label not in set(curves["label"])]
            if missing:
                ax.text(
                    0.02,
                    0.97,
                    "not shown, nothing learned:\n" + "\n".join(missing),
                    transform=ax.transAxes,
                    va="top",
                    fontsize=8,
                    color="0.3",
                )
        handles = [Line2D([0], [0], color=palette[label], linewidth=widths[label]) for label in labels]
        figure.legend(
            handles, labels, loc="upper center", ncol=min(len(labels), 4), frameon=False, bbox_to_anchor=(0.5, 1.0)
        )
        text = caption(data)
        figure.text(0.01, 0.01, text, fontsize=7.5, va="bottom", ha="left", color="0.25")
        figure.tight_layout(rect=(0, 0.035 * (text.count("\n") + 1) + 0.01, 1, 0.92))
        written = save_reproducible(figure, path_stem)
        plt.close(figure)
    return written


def sidecar(data: pd.DataFrame) -> dict[str, Any]:
    """What the CSV does not repeat per row: every quantizer's options (``metadata()``), parameter and plot scale."""
    first = data.iloc[0]
    per_quantizer = data.groupby("quantizer", sort=False).first()
    return {
        "figure": "LSQ (Esser et al. 2020) Figure 2 from each quantizer's autograd",
        "bits": int(first["bits"]),
        "signed": bool(first["signed"]),
        "step": float(first["step"]),
        "range": [float(data["v"].min()), float(data["v"].max())],
        "points": int((data["quantizer"] == first["quantizer"]).sum()),
        "figure_options": data.attrs.get("figure_options", {}),
        "quantizers": {
            name: {
                "param_name": row["param_name"],
                "plot_scale": float(row["plot_scale"]),
                "label": row["label"],
                "metadata": data.attrs.get("quantizers", {}).get(name, {}),
            }
            for name, row in per_quantizer.iterrows()
        },
        "caption": caption(data),
    }


def write_figure2(data: pd.DataFrame, path_stem: str | Path, with_input_grad: bool = False) -> list[Path]:
    """Write ``<stem>.csv`` (tidy data), ``<stem>.json`` (options), ``<stem>.png`` and ``<stem>.svg``."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path = path_stem.parent / (path_stem.name + ".csv")
    write_csv(csv_path, data, float_format="%.12g")
    json_path = write_json(path_stem.parent / (path_stem.name + ".json"), sidecar(data))
    return [csv_path, json_path, *draw_figure2(data, path_stem, with_input_grad)]
