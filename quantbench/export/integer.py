"""Integer inference (LSQ Figure 1): export a trained run as integer codes and run its layers on integers.

At inference a quantized conv/linear layer of LSQ computes, with ``w_bar`` / ``x_bar`` the integer codes and
``s_w`` / ``s_x`` the step sizes (paper eq. 1-2)::

    y = (w_bar (*) x_bar) * (s_w * s_x) + bias          (*) = integer conv / matmul, accumulated in int32

``quantbench export RUN_DIR`` writes one file (``RUN_DIR/export/model.int.pt``, a ``torch.save`` dict, loadable with
``weights_only=True``): for every quantized layer the integer weight codes (int8 storage, or bit-packed with
``--pack``), ``s_w`` (a float, or with per-channel weight steps a float64 tensor of one step per output channel,
axis 0), the activation requantizer (how a float input becomes codes) and ``s_x``; everything else
(BatchNorm, biases, full-precision layers) as float tensors; and the model description (the run's train config).
:class:`IntegerModel` rebuilds the network from that file alone and runs each quantized layer as:

1. requantize: ``x_bar = clamp(round(((x - offset) / width) * multiplier), lo, hi)``, the same float32 operations,
   in the same order, as the fake quantizer's forward (LSQ: offset 0, width s_x, multiplier 1), so the codes are
   the fake quantizer's codes bit for bit;
2. integer conv / matmul: im2col of the codes (``F.unfold``, done on float32-encoded codes, exact below 2^24), then an
   ``int32`` matmul of weight codes by activation codes (``int64`` if the layer's worst case
   ``K * max|w_bar| * max|x_bar|`` could overflow int32; never at 8 bits or below for these models);
3. rescale: ``accumulator * (s_w * s_x)`` in float64, plus the float bias, cast back to float32; with per-channel
   weight steps output channel ``c`` is rescaled by ``s_w[c] * s_x`` (the accumulator is per channel anyway, so
   per-channel steps cost nothing on integers; activations keep one step, so the requantizer is unchanged).

Everything between quantized layers (BatchNorm, ReLU, pooling, residual additions) stays float, as in Figure 1.

Which quantizers run on integers (each built-in declares its own ``integer_spec()``):

* ``lsq``, ``fixed`` and ``lsq_plus`` (without a weight offset): codes ``clamp(round(v/s), -Q_N, Q_P)``, value
  ``code * s``; with ``per_channel=true`` the weights' ``s`` is ``s_c``, one per output channel (axis 0).
* ``n2uq`` weights: levels ``sf_c (2i/n - 1)`` are odd codes ``2i - n`` times ``sf_c / n`` per output channel (its
  activations' learned thresholds have no requantizer, so an n2uq layer is refused as a whole).
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
* any other quantizer (a plugin) runs on integers through ``Quantizer.integer_spec()`` (the contract: an
  :class:`quantizers.IntegerSpec` with ``step`` (for weights a float, or a list with one per output channel),
  ``lo``, ``hi`` and, for activations, ``offset``, ``width``, ``multiplier``, optionally ``magnitude=True`` for
  sign-magnitude and ``stride=2`` for odd-only codes). The base class's default exports weights whose ``levels()``
  are a uniform grid and refuses activations, saying why.

Every export is verified on the first test batch: the weight codes times ``s_w`` equal the fake-quantized weights and
the requantized activation codes equal the fake quantizer's codes exactly, or the export fails saying which layer.
Per channel the weight check is per output channel: ``codes[c] * s_w[c]`` against channel ``c``'s fake-quantized
weights, to float32 rounding of the product relative to that channel's step.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import quantizers
from quantbench.errors import QuantbenchError
from quantbench.qat import QuantizedLayer, quantized_layers
from quantbench.training.rebuild import first_test_batch, load_run
from quantbench.utils.io import save_torch
from quantbench.utils.modules import capture_inputs
from quantizers import IntegerSpec

FORMAT = "quantbench-integer-v1"
DEFAULT_EXPORT = Path("export") / "model.int.pt"


def integer_spec_of(quantizer: quantizers.Quantizer) -> IntegerSpec:
    """The quantizer's own ``integer_spec()``; why it cannot run on integers as a :class:`QuantbenchError`."""
    try:
        spec = quantizer.integer_spec()
    except quantizers.QuantizerError as error:
        raise QuantbenchError(str(error)) from None
    if not isinstance(spec, IntegerSpec):
        name = quantizer.registry_name or type(quantizer).__name__
        raise QuantbenchError(f"quantizer '{name}': integer_spec() returned {type(spec).__name__}; return a "
                              "quantizers.IntegerSpec(step, lo, hi, ...)")
    return spec


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
    inputs = capture_inputs(model, dict(layers), check_batch) if check_batch is not None else {}
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


def weight_step_of(entry: dict[str, Any]) -> float | Tensor:
    """An export entry's ``s_w``: a float, or per output channel a float64 tensor of ``C_out`` steps (axis 0)."""
    step = entry["weight_step"]
    if isinstance(step, Tensor):
        if step.dim() != 1 or step.numel() != entry["weight_shape"][0]:
            raise QuantbenchError(f"export entry has {step.numel()} weight steps for {entry['weight_shape'][0]} output "
                                  "channels; rewrite it with quantbench export RUN_DIR")
        return step.to(torch.float64)
    return float(step)


def _export_weight(name: str, layer: QuantizedLayer, pack: bool) -> dict[str, Any]:
    quantizer = layer.weight_quantizer
    with torch.no_grad():  # first: a quantizer whose scale follows the weights (n2uq) states it for this forward
        fake = quantizer(layer.weight.detach()).double()
    spec = integer_spec_of(quantizer)
    try:  # one step per output channel (axis 0), the same step repeated for a per-tensor spec
        steps = spec.steps(fake.shape[0]).reshape((-1,) + (1,) * (fake.dim() - 1))
    except quantizers.QuantizerError as error:
        raise QuantbenchError(f"layer {name}: {error}") from None
    codes = torch.round(fake / steps)
    # per output channel: codes x s_w[c] reproduce that channel's fake-quantized weights up to float32 rounding of
    # the product (relative to that channel's step and magnitude; per tensor, to the tensor's)
    deviation = (codes * steps - fake).abs().flatten(1)
    magnitude = fake.abs().flatten(1).amax(dim=1, keepdim=True)
    if not spec.per_channel:
        magnitude = magnitude.amax().expand_as(magnitude)
    bound = 1e-5 * steps.flatten(1)[:, :1] + 1e-6 * magnitude
    error = float(deviation.max())
    if bool((deviation > bound).any()) or int(codes.min()) < spec.lo or int(codes.max()) > spec.hi:
        steps_text = f"{spec.step:.6g}" if not spec.per_channel else f"its {len(spec.step)} per-channel steps"
        raise QuantbenchError(
            f"layer {name}: quantizer '{quantizer.registry_name}' weights are not integer codes times {steps_text} "
            f"(max deviation {error:.3g}); it cannot run on integers"
        )
    if spec.stride == 2 and bool(((codes - spec.lo) % 2 != 0).any()):
        raise QuantbenchError(f"layer {name}: weight codes are not on the odd-code grid the quantizer declares")
    codes = codes.to(torch.int64)
    entry: dict[str, Any] = {
        "weight_shape": list(layer.weight.shape),
        "weight_bits": quantizer.bits,
        # a float, or a float64 tensor with one step per output channel (axis 0)
        "weight_step": steps.flatten() if spec.per_channel else spec.step,
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
    spec = integer_spec_of(quantizer)
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
    save_torch(payload, path)
    fp_state = {key: value for key, value in run.model.state_dict().items() if "_quantizer." not in key}
    layers = [{"layer": name, "weight_bits": entry["weight_bits"], "activation_bits": entry["input"]["bits"],
               "weights": math.prod(entry["weight_shape"]), "weight_step": _json_step(entry["weight_step"]),
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


def _json_step(step: float | Tensor) -> float | list[float]:
    return step.tolist() if isinstance(step, Tensor) else step


def step_text(step: float | list[float] | Tensor) -> str:
    """``s_w`` for a table: the step, or per channel the count and range of the steps."""
    if isinstance(step, (list, Tensor)):
        values = torch.as_tensor(step, dtype=torch.float64)
        return f"{values.numel()}ch {float(values.min()):.2g}..{float(values.max()):.2g}"
    return f"{step:.4g}"


def read_export(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"{path}: no such export; write it with quantbench export RUN_DIR")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated or foreign file: one line naming it
        raise QuantbenchError(f"{path} is truncated or not a quantbench integer export ({type(error).__name__}); "
                              "write it again with quantbench export RUN_DIR") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QuantbenchError(f"{path} is not a quantbench integer export ({FORMAT})")
    return payload
