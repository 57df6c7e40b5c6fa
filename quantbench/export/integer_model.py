"""The integer model of an export (LSQ Figure 1) and ``quantbench evaluate``: each quantized layer requantizes its
float input to codes, multiplies integer codes in int32 (int64 where the worst case could overflow) and rescales; the
fake-quantized and integer paths are compared image by image (see :mod:`quantbench.export.integer`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from quantbench.errors import QuantbenchError
from quantbench.export.integer import (DEFAULT_EXPORT, build_export, read_export, requantize, step_text, unpack_codes,
                                      weight_step_of)
from quantbench.qat import quantized_layers
from quantbench.training.rebuild import first_test_batch, load_run
from quantbench.utils.modules import accuracy, replace_submodule

PATHS = ("fake", "integer", "onnx")


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
        self.weight_step = weight_step_of(entry)  # a float, or one float64 step per output channel
        self.input_spec = dict(entry["input"])
        self.input_step = float(self.input_spec["step"])
        if isinstance(self.weight_step, Tensor):
            # s_w[c] * s_x in float64, shaped for the output's channel axis (1 for conv, last for linear)
            rescale = self.weight_step * self.input_step
            shape = (-1,) if self.geometry["kind"] == "linear" else (-1, 1, 1)
            self.register_buffer("rescale", rescale.reshape(shape))
        else:
            self.rescale = self.weight_step * self.input_step
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
        out = accumulated.to(torch.float64) * self.rescale
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
        return (f"{self.geometry['kind']}, weight codes {tuple(self.weight_codes.shape)} x {step_text(self.weight_step)}, "
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
        replace_submodule(model, name, IntegerLayer(entry))
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


#: relative distance from a rounding boundary within which two correct float32 evaluations may round differently
TIE_TOLERANCE = 1e-5


def images_at_rounding_ties(model: nn.Module, loader: DataLoader, tolerance: float = TIE_TOLERANCE) -> Tensor:
    """Per image, whether some quantized layer's input lies within ``tolerance`` (relative) of a rounding boundary
    (v/s = k + 1/2) in the fake-quantized model. Two float32 implementations that sum a convolution or a BatchNorm
    in another order differ by a few ulps, so at such an input one may round up and the other down: a code flip that
    no exporter can prevent. LSQ's step gradient changes sign at a boundary, so training can park a constant
    activation exactly on one (seen: an fc input at exactly 19.5 steps in three digits images)."""
    specs = {name: layer.input_quantizer.integer_spec() for name, layer in quantized_layers(model)
             if layer.input_quantizer is not None and layer.input_quantizer.integer_spec() is not None}
    flags: list[Tensor] = []
    current: list[Tensor] = []

    def record(spec: Any, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].double()
        below = requantize(x * (1 - tolerance), spec) != requantize(x * (1 + tolerance), spec)
        current.append(below.flatten(1).any(dim=1))

    layers = dict(quantized_layers(model))
    handles = [layers[name].register_forward_pre_hook(lambda m, a, spec=spec: record(spec, a)) for name, spec in specs.items()]
    model.eval()
    try:
        with torch.no_grad():
            for images, _ in loader:
                current.clear()
                model(images)
                flags.append(torch.stack(current).any(dim=0) if current else torch.zeros(len(images), dtype=torch.bool))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(flags)


def tie_diagnostics(model: nn.Module, loader: DataLoader, fake: Tensor, other: Tensor) -> dict[str, int]:
    """How many images have an activation at a rounding tie, and how many differ beyond 1e-5 without one (the only
    expected source of larger differences between two correct evaluations is such a tie)."""
    scale = float(fake.abs().max())
    not_close = ~torch.isclose(other.double(), fake.double(), rtol=1e-5, atol=1e-5 * scale).all(dim=1)
    ties = images_at_rounding_ties(model, loader)
    return {"images_at_rounding_tie": int(ties.sum()), "images_not_close_without_tie": int((not_close & ~ties).sum())}


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
    stats = {**compare_logits(fake, integer), **tie_diagnostics(fake_model, loader, fake, integer),
             "layer_max_rel_diff": layer_diff,
             "activation_codes_differing": differing, "activation_codes": total,
             "activation_codes_differing_by_layer": by_layer}
    return stats, fake, integer, torch.cat(labels)


def evaluate_paths(run_dir: str | Path, paths: tuple[str, ...] = ("fake", "integer"), export: str | Path | None = None,
                   data_dir: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """``quantbench evaluate``: top-1/top-5 of the fake-quantized and/or integer path on the whole test set; with
    both, how closely they agree (:func:`compare_models`). ``run_dir`` may also be an export file (integer path
    only). Without an export file the integer model is built in memory from the run."""
    from quantbench.data import create_dataset

    paths = tuple(dict.fromkeys(paths))
    for path in paths:
        if path not in PATHS:
            raise QuantbenchError(f"--path must be one of {', '.join(PATHS)}, got {path!r}")
    if "onnx" in paths:  # ONNX Runtime (quantbench.export.onnx), alone or compared with the fake path
        from quantbench.export.onnx import evaluate_onnx

        if "integer" in paths:
            raise QuantbenchError("--compare pairs the fake path with one other: --path integer or --path onnx")
        return evaluate_onnx(run_dir, compare="fake" in paths, export=export, data_dir=data_dir, batch_size=batch_size)
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
