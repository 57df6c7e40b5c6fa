"""Integer inference (LSQ Figure 1): export a trained run as integer codes and run its layers on integers.

At inference a quantized conv/linear layer of LSQ computes, with ``w_bar`` / ``x_bar`` the integer codes and
``s_w`` / ``s_x`` the step sizes (paper eq. 1-2)::

    y = (w_bar (*) x_bar) * (s_w * s_x) + bias          (*) = integer conv / matmul, accumulated in int32

``quantbench export RUN_DIR`` writes one file (``RUN_DIR/export/model.int.pt``, a ``torch.save`` dict, loadable with
``weights_only=True``): for every quantized layer the integer weight codes (int8 storage, or bit-packed with
``--pack``), ``s_w``, the activation requantizer (how a float input becomes codes) and ``s_x``; everything else
(BatchNorm, biases, full-precision layers) as float tensors; and the model description (the run's train config).
:class:`IntegerModel` rebuilds the network from that file alone and runs each quantized layer as:

1. requantize: ``x_bar = clamp(round(((x - offset) / width) * multiplier), lo, hi)``, the same float32 operations,
   in the same order, as the fake quantizer's forward (LSQ: offset 0, width s_x, multiplier 1), so the codes are
   the fake quantizer's codes bit for bit;
2. integer conv / matmul: im2col of the codes (``F.unfold``, done on float32-encoded codes, exact below 2^24), then an
   ``int32`` matmul of weight codes by activation codes (``int64`` if the layer's worst case
   ``K * max|w_bar| * max|x_bar|`` could overflow int32; never at 8 bits or below for these models);
3. rescale: ``accumulator * (s_w * s_x)`` in float64, plus the float bias, cast back to float32.

Everything between quantized layers (BatchNorm, ReLU, pooling, residual additions) stays float, as in Figure 1.

Which quantizers run on integers (``integer_spec``):

* ``lsq`` and ``fixed``: codes ``clamp(round(v/s), -Q_N, Q_P)``, value ``code * s``.
* ``pact``: activations ``clamp(round(clip(x, 0, alpha) / (alpha/Q_P)))`` (signed inputs: symmetric clip), value
  ``code * alpha/Q_P``; DoReFa weights are levels ``scale * (2i/n - 1)``, i.e. the **odd** integers
  ``k = 2i - n`` in ``[-n, n]`` times ``scale / n`` (n = 2^b - 1): a uniform grid offset by half a step, exported as
  those odd codes (int8 up to 7 bits, int16 at 8 bits; ``--pack`` stores ``i`` in b bits). DoReFa *activations*
  (a per-batch max inside tanh) have no fixed requantizer and are refused.
* ``qil``: weights are constants at export, so their codes ``k = q * w_bar`` are precomputed from the quantizer's own
  output, whatever gamma is: the output grid ``k / q * (c + d)`` is uniform for any gamma, only *which* weights land
  on which level depends on gamma. QIL activations have no gamma: ``clamp(round(((x - (c - d)) / 2d) * q), 0, q)``
  (sign-magnitude for signed inputs), value ``code * (c + d) / q`` (``1/q`` with ``output_scale="normalized"``). So
  **our QIL runs on integers for any gamma**; a transformer that were nonlinear on *activations* could not.
* any other quantizer (a plugin) runs on integers if it defines ``integer_spec()`` returning a dict with
  ``step``, ``lo``, ``hi`` and, for activations, ``offset``, ``width``, ``multiplier`` (and optionally
  ``magnitude=True`` for sign-magnitude, ``stride=2`` for odd-only codes). Weights of a quantizer without it are
  still exported when ``levels()`` is a uniform grid; its activations are refused with a :class:`QuantbenchError`.

Every export is verified on the first test batch: the weight codes times ``s_w`` equal the fake-quantized weights and
the requantized activation codes equal the fake quantizer's codes exactly, or the export fails saying which layer.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import quantizers
from quantbench.errors import QuantbenchError
from quantbench.quantize import QuantizedLayer, quantized_layers

FORMAT = "quantbench-integer-v1"
DEFAULT_EXPORT = Path("export") / "model.int.pt"
PATHS = ("fake", "integer")


# ---- loading a trained run -------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A finished ``quantbench train`` run rebuilt from its directory: config, data and the trained model (eval)."""

    directory: Path
    config: Any  # quantbench.train.TrainConfig
    data: Any  # quantbench.datasets.DatasetBundle
    model: nn.Module


def read_train_config(run_dir: str | Path) -> Any:
    """The ``TrainConfig`` recorded in ``RUN_DIR/config.json``."""
    from quantbench.train import TrainConfig

    directory = Path(run_dir)
    path = directory / "config.json"
    if not path.is_file():
        raise QuantbenchError(f"{run_dir}: not a quantbench run directory (no config.json); give a `quantbench train --out` directory")
    recorded = json.loads(path.read_text()).get("train", {})
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in recorded.items() if key in known})


def load_run(run_dir: str | Path, data_dir: str | None = None, require_quantized: bool = True) -> LoadedRun:
    """Rebuild a trained run: the model as trained (quantizers included) with ``RUN_DIR/model.pt`` loaded, in eval mode.

    The model is quantized exactly as ``train`` did it (activation signs decided on the first test batch of the run's
    batch size), then the final state_dict is loaded, quantizer steps included.
    """
    from quantbench.datasets import create_dataset
    from quantbench.train import build_model

    directory = Path(run_dir)
    config = read_train_config(directory)
    weights = directory / "model.pt"
    if not weights.is_file():
        raise QuantbenchError(f"{run_dir}: no model.pt, the run has not finished (resume it with quantbench train --resume)")
    if require_quantized and config.quantizer is None:
        raise QuantbenchError(f"{run_dir} is a full-precision run: nothing is quantized (give a run trained with --quantizer)")
    data = create_dataset(config.dataset, data_dir=data_dir or config.data_dir, download=False)
    sample_input = next(iter(DataLoader(data.test, batch_size=config.batch_size)))[0]
    rebuild = replace(config, init_from=None, distill=False, pretrained=False)
    model, _ = build_model(rebuild, data, sample_input)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise QuantbenchError(f"{weights} does not fit the model its config.json describes: {str(error).splitlines()[0]}") from None
    model.eval()
    return LoadedRun(directory, config, data, model)


def first_test_batch(data: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """The first ``batch_size`` test images and labels (the test set is never shuffled)."""
    return next(iter(DataLoader(data.test, batch_size=batch_size, shuffle=False)))


# ---- what a quantizer looks like on integers ------------------------------------------------------------------


@dataclass
class IntegerSpec:
    """A quantizer as integers: its output is ``code * step`` with integer ``code`` in ``[lo, hi]`` (every ``stride``-th).

    Activations also need the requantizer, float input -> code, written as the fake quantizer computes it:
    ``clamp(round(((x - offset) / width) * multiplier), lo, hi)`` (on ``|x|``, then times ``sign(x)``, when
    ``magnitude``). ``width`` is None for a quantizer that can only give weight codes.
    """

    step: float
    lo: int
    hi: int
    stride: int = 1
    offset: float = 0.0
    width: float | None = None
    multiplier: float = 1.0
    magnitude: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _f(value: Tensor | float) -> float:
    """A 0-d tensor as a Python float holding its exact value (float32 values are exact in float64)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def integer_spec(quantizer: quantizers.Quantizer, role: str) -> IntegerSpec:
    """How ``quantizer`` (in its current, trained state) runs on integers; QuantbenchError if it cannot."""
    from quantizers.fixed import FixedStep
    from quantizers.lsq import LSQ
    from quantizers.pact import PACT
    from quantizers.qil import QIL

    name = quantizer.registry_name or type(quantizer).__name__
    custom = getattr(quantizer, "integer_spec", None)
    if callable(custom):
        return IntegerSpec(**custom())
    if isinstance(quantizer, LSQ):
        step = _f(quantizer.effective_step())
        return IntegerSpec(step, -quantizer.qn, quantizer.qp, width=step)
    if isinstance(quantizer, FixedStep):
        step = _f(quantizer.step_size)
        return IntegerSpec(step, -quantizer.qn, quantizer.qp, width=step)
    if isinstance(quantizer, PACT):
        if quantizer.dorefa:
            n = quantizer.levels_span
            if role == "activation":
                raise QuantbenchError(
                    f"quantizer '{name}' uses DoReFa on activations: its codes depend on each batch's max|tanh x|, so "
                    "there is no fixed integer requantizer; use weight_scheme=symmetric for signed activations"
                )
            # levels scale * (2i/n - 1) = (2i - n) * scale/n: odd codes in [-n, n]
            return IntegerSpec(_f(quantizer.scale) / n, -n, n, stride=2)
        alpha = quantizer.effective_alpha().detach()
        step = _f(alpha / quantizer.qp)  # the float32 step the fake quantizer divides by
        return IntegerSpec(step, -quantizer.qp if quantizer.signed else 0, quantizer.qp, width=step)
    if isinstance(quantizer, QIL):
        prune, clip, distance = (t.detach() for t in quantizer.interval())
        scale = _f(clip.clamp_min(quantizer.min_distance)) if quantizer.output_scale == "clip" else 1.0
        q = quantizer.q
        lo = -q if quantizer.signed else 0
        if role == "weight":
            # weight codes are precomputed from the quantizer's own output, so gamma does not matter
            return IntegerSpec(scale / q, lo, q)
        if quantizer.learn_gamma:
            raise QuantbenchError(
                f"quantizer '{name}' applies a learned exponent gamma to activations: x -> codes is then nonlinear "
                "and has no integer requantizer (QIL's activations have no gamma; only weights do)"
            )
        return IntegerSpec(scale / q, lo, q, offset=_f(prune), width=_f(2 * distance), multiplier=float(q),
                           magnitude=quantizer.signed)
    if role == "weight":
        return _spec_from_levels(quantizer, name)
    raise QuantbenchError(
        f"quantizer '{name}' cannot run on integers: quantbench does not know how its activations become integer "
        "codes; give the class an integer_spec() method (see quantbench.integer) or keep its layers in full "
        "precision (--first-last-bits fp does not help for middle layers)"
    )


def _spec_from_levels(quantizer: quantizers.Quantizer, name: str) -> IntegerSpec:
    """Weight codes of an unknown quantizer: its levels() must be a uniform grid through 0 or offset by half a step."""
    levels = quantizer.levels().detach().double().flatten().sort().values
    if levels.numel() < 2:
        raise QuantbenchError(f"quantizer '{name}' has fewer than two levels: no integer grid")
    gaps = levels[1:] - levels[:-1]
    gap = float(gaps.mean())
    if not gap > 0 or float((gaps - gap).abs().max()) > 1e-4 * gap:
        raise QuantbenchError(f"quantizer '{name}' cannot run on integers: its levels are not uniformly spaced")
    for stride in (1, 2):
        unit = gap / stride
        codes = levels / unit
        if float((codes - codes.round()).abs().max()) < 1e-3:
            return IntegerSpec(unit, int(codes.round().min()), int(codes.round().max()), stride=stride)
    raise QuantbenchError(
        f"quantizer '{name}' cannot run on integers: its levels are uniform but not integer multiples of one step"
    )


def requantize(x: Tensor, spec: IntegerSpec | dict[str, Any]) -> Tensor:
    """Activation codes of float ``x`` (a float tensor holding integers), computed as the fake quantizer does."""
    get = spec.get if isinstance(spec, dict) else lambda key: getattr(spec, key)
    dtype = x.dtype
    offset = torch.tensor(get("offset"), dtype=dtype)
    width = torch.tensor(get("width"), dtype=dtype)
    multiplier = float(get("multiplier"))
    magnitude = x.abs() if get("magnitude") else x
    codes = torch.round(((magnitude - offset) / width) * multiplier) if get("offset") or multiplier != 1.0 \
        else torch.round(magnitude / width)
    codes = torch.clamp(codes, get("lo") if not get("magnitude") else 0, get("hi"))
    return codes * torch.sign(x) if get("magnitude") else codes


# ---- bit packing --------------------------------------------------------------------------------------------------


def code_bits(lo: int, hi: int, stride: int = 1) -> int:
    """Bits needed per code for codes ``lo, lo + stride, ..., hi``."""
    return max(1, math.ceil(math.log2((hi - lo) // stride + 1)))


def pack_codes(codes: Tensor, lo: int, stride: int, bits: int) -> Tensor:
    """Pack integer codes into a uint8 bitstream, ``bits`` per code (least significant bit first)."""
    unsigned = ((codes.flatten().to(torch.int64) - lo) // stride)
    bit_planes = (unsigned[:, None] >> torch.arange(bits)) & 1
    stream = bit_planes.flatten()
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, numel: int, lo: int, stride: int, bits: int) -> Tensor:
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).flatten()[: numel * bits]
    unsigned = (stream.view(numel, bits) << torch.arange(bits)).sum(1)
    return unsigned * stride + lo


def storage_dtype(lo: int, hi: int) -> torch.dtype:
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int64


# ---- export -------------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path
    file_bytes: int
    fp_bytes: int  # the full-precision float32 state_dict of the same network, torch.save'd
    run_model_bytes: int  # the run's model.pt (fake-quantized float weights plus quantizer state)
    weight_payload_bits: int  # the quantized weights' codes at their bit widths (packing's lower bound)
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _serialized_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def _conv_geometry(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise QuantbenchError(f"integer conv supports numeric zero padding only, got padding={layer.padding!r} "
                                  f"padding_mode={layer.padding_mode!r}")
        return {"kind": "conv2d", "in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "padding": list(layer.padding),
                "dilation": list(layer.dilation), "groups": layer.groups}
    return {"kind": "linear", "in_features": layer.in_features, "out_features": layer.out_features}


def build_export(model: nn.Module, description: dict[str, Any], check_batch: Tensor | None = None,
                 pack: bool = False) -> dict[str, Any]:
    """The export payload of a (trained, eval-mode) quantized model; verified on ``check_batch`` when given."""
    layers = quantized_layers(model)
    if not layers:
        raise QuantbenchError("the model has no quantized layer to export")
    inputs = _capture_inputs(model, check_batch) if check_batch is not None else {}
    entries: dict[str, Any] = {}
    dropped: set[str] = set()
    for name, layer in layers:
        if layer.weight_quantizer is None or layer.input_quantizer is None:
            raise QuantbenchError(f"layer {name} quantizes only one of weight and input; integer inference needs both")
        entry = {**_conv_geometry(layer), "quantizer": layer.weight_quantizer.registry_name}
        entry.update(_export_weight(name, layer, pack))
        entry["input"] = _export_input(name, layer.input_quantizer, inputs.get(name))
        entry["bias"] = None if layer.bias is None else layer.bias.detach().clone()
        entries[name] = entry
        dropped |= {f"{name}.weight", f"{name}.bias"}
    float_state = {key: value.detach().clone() for key, value in model.state_dict().items()
                   if key not in dropped and "_quantizer." not in key}
    return {"format": FORMAT, "description": description, "layers": entries, "float_state": float_state,
            "packed": bool(pack)}


def _export_weight(name: str, layer: QuantizedLayer, pack: bool) -> dict[str, Any]:
    quantizer = layer.weight_quantizer
    spec = integer_spec(quantizer, "weight")
    with torch.no_grad():
        fake = quantizer(layer.weight.detach()).double()
    codes = torch.round(fake / spec.step)
    error = float((codes * spec.step - fake).abs().max()) if fake.numel() else 0.0
    if error > 1e-5 * spec.step + 1e-6 * float(fake.abs().max()) or int(codes.min()) < spec.lo or int(codes.max()) > spec.hi:
        raise QuantbenchError(
            f"layer {name}: quantizer '{quantizer.registry_name}' weights are not integer codes times {spec.step:.6g} "
            f"(max deviation {error:.3g}); it cannot run on integers"
        )
    if spec.stride == 2 and bool(((codes - spec.lo) % 2 != 0).any()):
        raise QuantbenchError(f"layer {name}: weight codes are not on the odd-code grid the quantizer declares")
    codes = codes.to(torch.int64)
    entry: dict[str, Any] = {
        "weight_shape": list(layer.weight.shape),
        "weight_bits": quantizer.bits,
        "weight_step": spec.step,
        "weight_lo": spec.lo,
        "weight_hi": spec.hi,
        "weight_stride": spec.stride,
    }
    if pack:
        bits = code_bits(spec.lo, spec.hi, spec.stride)
        entry["weight_packed"] = pack_codes(codes, spec.lo, spec.stride, bits)
        entry["weight_pack_bits"] = bits
    else:
        entry["weight_codes"] = codes.to(storage_dtype(spec.lo, spec.hi))
    return entry


def _export_input(name: str, quantizer: quantizers.Quantizer, sample: Tensor | None) -> dict[str, Any]:
    spec = integer_spec(quantizer, "activation")
    if spec.width is None:
        raise QuantbenchError(
            f"layer {name}: quantizer '{quantizer.registry_name}' gives no activation requantizer; it cannot run on integers"
        )
    if sample is not None:
        with torch.no_grad():
            fake = quantizer(sample)
        codes = requantize(sample, spec)
        mismatched = int(((codes * spec.step).double() - fake.double()).abs().gt(0.25 * spec.step).sum())
        if mismatched:
            raise QuantbenchError(
                f"layer {name}: {mismatched} of {sample.numel()} activation codes of quantizer '{quantizer.registry_name}' "
                "differ from its fake-quantized output; its activations cannot be reproduced on integers"
            )
    return {**spec.as_dict(), "bits": quantizer.bits, "signed": quantizer.signed}


def _capture_inputs(model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
    """Each quantized layer's input (before quantization) on ``batch``."""
    captured: dict[str, Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda module, args, name=name: captured.setdefault(name, args[0].detach()))
        for name, layer in quantized_layers(model)
    ]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def export_run(run_dir: str | Path, out: str | Path | None = None, pack: bool = False,
               data_dir: str | None = None) -> ExportResult:
    """``quantbench export``: write ``RUN_DIR/export/model.int.pt`` (or ``out``) and measure its size."""
    started = time.perf_counter()
    run = load_run(run_dir, data_dir)
    description = {
        "train": {key: value for key, value in vars(run.config).items()},
        "num_classes": run.data.num_classes,
        "in_channels": run.data.in_channels,
        "image_size": run.data.image_size,
        "run_dir": str(run.directory),
    }
    check_batch = first_test_batch(run.data, 256)[0]
    payload = build_export(run.model, description, check_batch, pack=pack)
    path = Path(out) if out is not None else run.directory / DEFAULT_EXPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    fp_state = {key: value for key, value in run.model.state_dict().items() if "_quantizer." not in key}
    layers = [{"layer": name, "weight_bits": entry["weight_bits"], "activation_bits": entry["input"]["bits"],
               "weights": math.prod(entry["weight_shape"]), "weight_step": entry["weight_step"],
               "activation_step": entry["input"]["step"]}
              for name, entry in payload["layers"].items()]
    return ExportResult(
        path=path,
        file_bytes=path.stat().st_size,
        fp_bytes=_serialized_bytes(fp_state),
        run_model_bytes=(run.directory / "model.pt").stat().st_size,
        weight_payload_bits=sum(row["weights"] * code_bits(e["weight_lo"], e["weight_hi"], e["weight_stride"])
                                for row, e in zip(layers, payload["layers"].values())),
        layers=layers,
        seconds=time.perf_counter() - started,
    )


def read_export(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"{path}: no such export; write it with quantbench export RUN_DIR")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QuantbenchError(f"{path} is not a quantbench integer export ({FORMAT})")
    return payload


# ---- the integer model --------------------------------------------------------------------------------------------


class IntegerLayer(nn.Module):
    """One quantized conv/linear run on integers: requantize, int32 (or int64) multiply-accumulate, rescale."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__()
        self.geometry = {key: entry[key] for key in entry if key in (
            "kind", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
            "in_features", "out_features")}
        if "weight_codes" in entry:
            codes = entry["weight_codes"].to(torch.int64)
        else:
            numel = math.prod(entry["weight_shape"])
            codes = unpack_codes(entry["weight_packed"], numel, entry["weight_lo"], entry["weight_stride"],
                                 entry["weight_pack_bits"])
        self.register_buffer("weight_codes", codes.reshape(entry["weight_shape"]).to(torch.int32))
        self.weight_step = float(entry["weight_step"])
        self.input_spec = dict(entry["input"])
        self.input_step = float(self.input_spec["step"])
        bias = entry.get("bias")
        self.register_buffer("bias", None if bias is None else bias.clone())
        # worst-case |accumulator| decides int32 vs int64
        fan_in = math.prod(entry["weight_shape"][1:])
        w_max = max(abs(entry["weight_lo"]), abs(entry["weight_hi"]))
        x_max = max(abs(self.input_spec["lo"]), abs(self.input_spec["hi"]))
        self.accumulator = torch.int32 if fan_in * w_max * x_max < 2**31 else torch.int64

    def forward(self, x: Tensor) -> Tensor:
        codes = requantize(x, self.input_spec)  # float32 holding integers
        weight = self.weight_codes.to(self.accumulator)
        if self.geometry["kind"] == "linear":
            accumulated = codes.to(self.accumulator) @ weight.t()
        else:
            accumulated = self._conv(codes, weight)
        out = accumulated.to(torch.float64) * (self.weight_step * self.input_step)
        if self.bias is not None:
            shape = (1, -1) + (1,) * (out.dim() - 2)
            out = out + self.bias.to(torch.float64).view(shape)
        return out.to(x.dtype)

    def _conv(self, codes: Tensor, weight: Tensor) -> Tensor:
        g = self.geometry
        batch, _, height, width = codes.shape
        kh, kw = g["kernel_size"]
        (sh, sw), (ph, pw), (dh, dw) = g["stride"], g["padding"], g["dilation"]
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        # im2col on float32-encoded codes (exact for |code| < 2^24), then integer matmul
        columns = F.unfold(codes, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
        columns = columns.to(self.accumulator)
        groups = g["groups"]
        out_channels = weight.shape[0]
        columns = columns.view(batch, groups, -1, columns.shape[-1])
        weight = weight.reshape(groups, out_channels // groups, -1)
        accumulated = torch.matmul(weight.unsqueeze(0), columns)  # (B, groups, Cout/groups, L)
        return accumulated.reshape(batch, out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        return (f"{self.geometry['kind']}, weight codes {tuple(self.weight_codes.shape)} x {self.weight_step:.4g}, "
                f"input codes [{self.input_spec['lo']}, {self.input_spec['hi']}] x {self.input_step:.4g}, "
                f"accumulator {str(self.accumulator).replace('torch.', '')}")


def integer_model(payload: dict[str, Any]) -> nn.Module:
    """The network of an export, with each quantized layer an :class:`IntegerLayer` (eval mode)."""
    from quantbench.models import create_model

    description = payload["description"]
    train = description["train"]
    model = create_model(train["model"], num_classes=description["num_classes"], in_channels=description["in_channels"])
    result = model.load_state_dict(payload["float_state"], strict=False)
    expected = {f"{name}.{part}" for name in payload["layers"] for part in ("weight", "bias")}
    if result.unexpected_keys or not set(result.missing_keys) <= expected:
        raise QuantbenchError(f"the export does not fit model {train['model']}: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")
    for name, entry in payload["layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, IntegerLayer(entry))
    return model.eval()


# ---- evaluation ---------------------------------------------------------------------------------------------------


def logits_of(model: nn.Module, loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Logits and labels over a loader (eval mode, no grad)."""
    model.eval()
    outputs, labels = [], []
    with torch.no_grad():
        for images, target in loader:
            outputs.append(model(images))
            labels.append(target)
    return torch.cat(outputs), torch.cat(labels)


def accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    total = labels.numel()
    return {"top1": 100.0 * int((top[:, 0] == labels).sum()) / total,
            "top5": 100.0 * int((top == labels[:, None]).any(dim=1).sum()) / total}


def compare_logits(fake: Tensor, integer: Tensor) -> dict[str, Any]:
    """How closely the integer path's logits reproduce the fake-quantized ones."""
    difference = (fake.double() - integer.double()).abs()
    scale = float(fake.abs().max())
    return {
        "images": fake.shape[0],
        "prediction_agreement": 100.0 * int((fake.argmax(1) == integer.argmax(1)).sum()) / fake.shape[0],
        "predictions_differing": int((fake.argmax(1) != integer.argmax(1)).sum()),
        "max_abs_logit_diff": float(difference.max()),
        "max_abs_logit": scale,
        "max_rel_logit_diff": float(difference.max()) / scale if scale > 0 else 0.0,
        "logits_allclose": bool(torch.allclose(integer.double(), fake.double(), rtol=1e-5, atol=1e-5 * scale)),
        "images_logits_not_close": int((~torch.isclose(integer.double(), fake.double(), rtol=1e-5,
                                                       atol=1e-5 * scale)).any(dim=1).sum()),
    }


def compare_models(fake_model: nn.Module, int_model: nn.Module, loader: DataLoader) -> tuple[dict[str, Any], Tensor, Tensor, Tensor]:
    """Run the fake-quantized and the integer model side by side over ``loader``.

    Besides the logits, two diagnostics separate the integer arithmetic from float32 rounding:

    * ``layer_max_rel_diff``: each integer layer applied to *the fake model's own input* of that layer (so both see
      the same codes), max |difference| / max |fake output| over layers and batches: the integer multiply-accumulate
      and rescale alone, float32 rounding only;
    * ``activation_codes_differing``: input codes of a quantized layer that differ between the two paths end to end.
      The fake path accumulates its convolutions in float32 and the integer path exactly, so an activation that lies
      within float32 rounding of a rounding boundary (v/s = k + 1/2) can land on the neighbouring code in the next
      layer; there is no other source of difference.
    """
    fake_layers = dict(quantized_layers(fake_model))
    int_layers = {name: module for name, module in int_model.named_modules() if isinstance(module, IntegerLayer)}
    if set(fake_layers) != set(int_layers):
        raise QuantbenchError("the export's integer layers do not match the run's quantized layers")
    fake_inputs: dict[str, Tensor] = {}
    fake_outputs: dict[str, Tensor] = {}
    int_inputs: dict[str, Tensor] = {}
    handles = []
    for name, layer in fake_layers.items():
        handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: fake_inputs.__setitem__(n, a[0])))
        handles.append(layer.register_forward_hook(lambda m, a, out, n=name: fake_outputs.__setitem__(n, out)))
    for name, layer in int_layers.items():
        handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: int_inputs.__setitem__(n, a[0])))
    fake_model.eval()
    int_model.eval()
    fake_logits, int_logits, labels = [], [], []
    differing = total = 0
    by_layer = dict.fromkeys(int_layers, 0)
    layer_diff = 0.0
    try:
        with torch.no_grad():
            for images, target in loader:
                fake_logits.append(fake_model(images))
                int_logits.append(int_model(images))
                labels.append(target)
                for name, layer in int_layers.items():
                    spec = layer.input_spec
                    flips = int((requantize(fake_inputs[name], spec) != requantize(int_inputs[name], spec)).sum())
                    differing += flips
                    by_layer[name] += flips
                    total += fake_inputs[name].numel()
                    reference = fake_outputs[name]
                    same_input = layer(fake_inputs[name])
                    scale = float(reference.abs().max())
                    if scale > 0:
                        layer_diff = max(layer_diff, float((same_input - reference).abs().max()) / scale)
    finally:
        for handle in handles:
            handle.remove()
    fake, integer = torch.cat(fake_logits), torch.cat(int_logits)
    stats = {**compare_logits(fake, integer), "layer_max_rel_diff": layer_diff,
             "activation_codes_differing": differing, "activation_codes": total,
             "activation_codes_differing_by_layer": by_layer}
    return stats, fake, integer, torch.cat(labels)


def evaluate_paths(run_dir: str | Path, paths: tuple[str, ...] = PATHS, export: str | Path | None = None,
                   data_dir: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """``quantbench evaluate``: top-1/top-5 of the fake-quantized and/or integer path on the whole test set; with
    both, how closely they agree (:func:`compare_models`). ``run_dir`` may also be an export file (integer path
    only). Without an export file the integer model is built in memory from the run."""
    from quantbench.datasets import create_dataset

    paths = tuple(dict.fromkeys(paths))
    for path in paths:
        if path not in PATHS:
            raise QuantbenchError(f"--path must be one of {', '.join(PATHS)}, got {path!r}")
    source = Path(run_dir)
    if not source.exists():
        raise QuantbenchError(f"{run_dir}: no such run directory or export file")
    if source.is_file() and "fake" in paths:
        raise QuantbenchError(f"{run_dir} is an export file: only --path integer runs from it (give the run directory for fake)")
    export_path = source if source.is_file() else Path(export) if export else source / DEFAULT_EXPORT
    if export is not None and not export_path.is_file():
        raise QuantbenchError(f"--export {export}: no such file; write it with quantbench export RUN_DIR --out {export}")
    in_memory = "integer" in paths and not export_path.is_file()
    run = load_run(source, data_dir) if "fake" in paths or in_memory else None
    results: dict[str, Any] = {"run": str(source)}
    int_model = None
    if "integer" in paths:
        if in_memory:
            description = {"train": vars(run.config), "num_classes": run.data.num_classes,
                           "in_channels": run.data.in_channels, "image_size": run.data.image_size}
            payload = build_export(run.model, description, first_test_batch(run.data, 256)[0])
            results["export"] = "built in memory (no export file; write one with quantbench export)"
        else:
            payload = read_export(export_path)
            results["export"] = str(export_path)
        int_model = integer_model(payload)
        train = payload["description"]["train"]
        data = run.data if run is not None else create_dataset(train["dataset"], data_dir=data_dir or train.get("data_dir"))
    else:
        data = run.data
    loader = DataLoader(data.test, batch_size=batch_size, shuffle=False)
    started = time.perf_counter()
    if len(paths) == 2:
        stats, fake, integer, labels = compare_models(run.model, int_model, loader)
        results["fake"], results["integer"] = accuracy(fake, labels), accuracy(integer, labels)
        results["comparison"] = stats
    else:
        logits, labels = logits_of(run.model if paths[0] == "fake" else int_model, loader)
        results[paths[0]] = accuracy(logits, labels)
    results["images"] = int(labels.numel())
    results["seconds"] = time.perf_counter() - started
    return results
