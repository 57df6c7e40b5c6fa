"""Deploy through ONNX Runtime: ``quantbench export RUN_DIR --format onnx`` writes ``RUN_DIR/export/model.onnx`` in
the QDQ form that ONNX Runtime, TensorRT and OpenVINO read, and ``quantbench evaluate RUN_DIR --path onnx`` runs it.

Every quantized conv/linear layer becomes, in the graph::

    x -> [requantizer] -> QuantizeLinear -> DequantizeLinear (s_x) --\\
    int8 weight codes (initializer) -> DequantizeLinear (s_w) ---------> Conv / Gemm (+ float bias)

The weight codes and steps are the integer export's (:func:`quantbench.export.integer.build_export`, which also
verifies them against the fake quantizer), so the two exports agree by construction. Per quantizer
(``Quantizer.integer_spec()``):

* lsq, fixed, pact (clip): ``QuantizeLinear(x, s, 0)`` and ``DequantizeLinear(., s, 0)`` at the learned step;
  unsigned activations use uint8, signed int8. ONNX saturates at the storage type's range, so a code range narrower
  than it (e.g. [-2, 1] at 2 bits) is clipped in float first (``Clip(x, lo*s, hi*s)``: the same codes).
* qil: the activation requantizer has an offset and a width that are not the output step
  (``codes = clamp(round(((x - (c - d)) / 2d) * q), 0, q)``, value ``code * (c + d)/q``), which no integer zero
  point can express. It is written as the fake quantizer computes it, ``Sub``, ``Div``, ``Mul`` then
  ``QuantizeLinear`` with scale 1 (``Abs`` in front and ``Mul`` by ``Sign`` after for sign-magnitude signed
  inputs), so the codes agree bit for bit; the ``DequantizeLinear`` holds the learned output step. QIL's weight
  transform (gamma) is baked into the weight codes, which are precomputed from the quantizer's own output.
* pact's DoReFa weights are odd codes ``2i - n`` times ``scale/n``: int8 up to 7 bits; at 8 bits they need int16,
  which ``DequantizeLinear`` accepts from opset 21 (that graph is opset 21, the others opset 17).
* per-channel weight steps (lsq, fixed, lsq_plus with ``per_channel=true``): the weight ``DequantizeLinear`` takes
  its per-axis form, a 1-D scale of ``C_out`` steps and ``axis=0`` (opset 13 on); ONNX Runtime computes
  ``code * s_c`` in float32 as the fake quantizer does, so the float weights are the same. Activations keep one step.

Refused with one line: a quantizer without integer codes (non-uniform levels, DoReFa activations, a plugin without
``integer_spec()``) and bit widths outside 2..8 (QuantizeLinear holds 8-bit codes at most).
"""

from __future__ import annotations

import copy
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from quantbench.errors import QuantbenchError
from quantbench.export.integer import build_export, requantize, unpack_codes
from quantbench.qat import quantized_layers
from quantbench.utils.io import atomic_path
from quantbench.utils.modules import capture_inputs, replace_submodule

ONNX_EXPORT = Path("export") / "model.onnx"
INSTALL = "pip install quantbench[export]"
OPSET, OPSET_INT16 = 17, 21  # 17: widely deployed; 21: the first with int16 DequantizeLinear
MIN_ONNX_BITS, MAX_ONNX_BITS = 2, 8


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or the one-line error naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise QuantbenchError(f"the ONNX export needs onnx and onnxruntime ({error.name} is missing): {INSTALL}") from None
    return onnx, onnxruntime


# ---- the QDQ layer: torch modules whose ONNX export is the QDQ pattern ------------------------------------------


def _const(g: Any, value: float | int, dtype: torch.dtype) -> Any:
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _storage(lo: int, hi: int) -> torch.dtype:
    return torch.uint8 if lo >= 0 else torch.int8


class _QuantizeActivation(torch.autograd.Function):
    """Forward: the fake quantizer's value (so tracing sees real shapes); ONNX: the QDQ subgraph of the module doc."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: dict[str, Any]) -> Tensor:  # noqa: ARG004 - ctx unused: export only
        return requantize(x, spec) * torch.tensor(spec["step"], dtype=x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any, spec: dict[str, Any]) -> Any:
        f32 = torch.float32
        value = g.op("Abs", x) if spec["magnitude"] else x
        affine = bool(spec["offset"]) or float(spec["multiplier"]) != 1.0
        if affine:
            # the fake quantizer's own operations, in its order, so that round() sees the same float32 value
            if spec["offset"]:
                value = g.op("Sub", value, _const(g, spec["offset"], f32))
            value = g.op("Div", value, _const(g, spec["width"], f32))
            if float(spec["multiplier"]) != 1.0:
                value = g.op("Mul", value, _const(g, spec["multiplier"], f32))
            scale = 1.0
        else:
            scale = float(spec["width"])
        lo, hi = (0 if spec["magnitude"] else spec["lo"]), spec["hi"]
        storage = _storage(lo, hi)
        info = torch.iinfo(storage)
        if lo > info.min or hi < info.max:  # QuantizeLinear saturates at the type's range only
            value = g.op("Clip", value, _const(g, lo * scale, f32), _const(g, hi * scale, f32))
        zero = _const(g, 0, storage)
        codes = g.op("QuantizeLinear", value, _const(g, scale, f32), zero)
        out = g.op("DequantizeLinear", codes, _const(g, float(spec["step"]), f32), zero)
        return g.op("Mul", out, g.op("Sign", x)) if spec["magnitude"] else out


class _DequantizeWeight(torch.autograd.Function):
    """Integer weight codes (an initializer) times their step: one DequantizeLinear in ONNX; per channel (a 1-D step,
    one per output channel) its per-axis form, ``axis=0``."""

    @staticmethod
    def forward(ctx: Any, codes: Tensor, step: Tensor, per_channel: bool) -> Tensor:  # noqa: ARG004
        if per_channel:
            return codes.to(torch.float32) * step.reshape((-1,) + (1,) * (codes.dim() - 1))
        return codes.to(torch.float32) * step

    @staticmethod
    def symbolic(g: Any, codes: Any, step: Any, per_channel: bool) -> Any:
        if per_channel:
            return g.op("DequantizeLinear", codes, step, axis_i=0)
        return g.op("DequantizeLinear", codes, step)


class QDQLayer(nn.Module):
    """One quantized conv/linear layer of an integer-export entry, exported as the QDQ pattern."""

    def __init__(self, name: str, entry: dict[str, Any]) -> None:
        super().__init__()
        for role, bits in (("weight", entry["weight_bits"]), ("activation", entry["input"]["bits"])):
            if not MIN_ONNX_BITS <= bits <= MAX_ONNX_BITS:
                raise QuantbenchError(
                    f"layer {name}: {bits}-bit {role}s cannot be exported to ONNX QDQ (QuantizeLinear holds "
                    f"{MIN_ONNX_BITS}..{MAX_ONNX_BITS}-bit codes); train with --bits and --first-last-bits in that range")
        if "weight_codes" in entry:
            codes = entry["weight_codes"].to(torch.int64)
        else:
            codes = unpack_codes(entry["weight_packed"], int(torch.tensor(entry["weight_shape"]).prod()),
                                 entry["weight_lo"], entry["weight_stride"], entry["weight_pack_bits"])
        dtype = torch.int8 if -128 <= entry["weight_lo"] and entry["weight_hi"] <= 127 else torch.int16
        self.register_buffer("weight_codes", codes.reshape(entry["weight_shape"]).to(dtype))
        # one float32 step, or per channel a 1-D float32 tensor of C_out steps (DequantizeLinear's per-axis scale)
        step = entry["weight_step"]
        step = step.detach().clone() if isinstance(step, Tensor) else torch.tensor(step)
        self.register_buffer("weight_step", step.to(torch.float32))
        bias = entry.get("bias")
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.spec = dict(entry["input"])
        self.geometry = {key: entry.get(key) for key in ("kind", "stride", "padding", "dilation", "groups")}

    def forward(self, x: Tensor) -> Tensor:
        x = _QuantizeActivation.apply(x, self.spec)
        weight = _DequantizeWeight.apply(self.weight_codes, self.weight_step, self.weight_step.dim() == 1)
        g = self.geometry
        if g["kind"] == "linear":
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, tuple(g["stride"]), tuple(g["padding"]), tuple(g["dilation"]), g["groups"])


# ---- export -----------------------------------------------------------------------------------------------------


def deployable(model: nn.Module) -> nn.Module:
    """The model as deployed: BatchNorm folded into the conv where the run trained it folded (``--bn fold``)."""
    from quantbench.qat_bnfold import deployable as unfold

    return unfold(model)


def qdq_model(model: nn.Module, check_batch: Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of a trained quantized model with each quantized layer a :class:`QDQLayer`, and the integer export
    payload it was made from (verified on ``check_batch``)."""
    model = deployable(model).eval()
    try:
        payload = build_export(model, {}, check_batch)
    except QuantbenchError as error:
        raise QuantbenchError(f"cannot export to ONNX: {error}") from None
    exported = copy.deepcopy(model)
    for name, entry in payload["layers"].items():
        replace_submodule(exported, name, QDQLayer(name, entry))
    fixed_adaptive_pools(exported, check_batch[:1])
    return exported.eval(), payload


def _pool_window(size: int, out: int) -> tuple[int, int] | None:
    """(kernel, stride) of the AvgPool equal to adaptive average pooling from ``size`` to ``out`` cells, when every
    adaptive bin has one width and the bins start at a fixed stride (torch's bins: floor(i n/m) to ceil((i+1) n/m))."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-((-(i + 1) * size) // out) for i in range(out)]
    widths = {end - start for start, end in zip(starts, ends)}
    strides = {b - a for a, b in zip(starts, starts[1:])} or {1}
    return (widths.pop(), strides.pop()) if len(widths) == 1 and len(strides) == 1 else None


def fixed_adaptive_pools(model: nn.Module, sample: Tensor) -> None:
    """Replace each ``AdaptiveAvgPool2d`` by the ``AvgPool2d`` it equals at the sample's (the dataset's fixed) input
    size: the ONNX exporter handles adaptive pooling only when the output divides the input (small_cnn on 28x28
    Fashion-MNIST pools 3x3 to 2x2, i.e. a 2x2 window at stride 1). One line when no plain window is equal."""
    pools = {name: module for name, module in model.named_modules() if isinstance(module, nn.AdaptiveAvgPool2d)}
    for name, inputs in capture_inputs(model, pools, sample).items():
        height, width = inputs.shape[-2:]
        out = nn.modules.utils._pair(model.get_submodule(name).output_size)
        out = (out[0] or height, out[1] or width)
        rows, cols = _pool_window(height, out[0]), _pool_window(width, out[1])
        if rows is None or cols is None:
            raise QuantbenchError(f"cannot export to ONNX: {name} pools {height}x{width} to {out[0]}x{out[1]} with "
                                  "uneven windows, which ONNX's AveragePool cannot express; change the model's "
                                  "pooling or its input size")
        replace_submodule(model, name, nn.AvgPool2d((rows[0], cols[0]), stride=(rows[1], cols[1])))


def onnx_bytes(model: nn.Module, check_batch: Tensor, metadata: dict[str, Any] | None = None) -> bytes:
    """The ONNX QDQ graph of a trained quantized model, checked with ``onnx.checker`` (dynamic batch size)."""
    onnx, _ = require_onnx()
    exported, payload = qdq_model(model, check_batch)
    wide = any(layer.weight_codes.dtype == torch.int16 for layer in exported.modules() if isinstance(layer, QDQLayer))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter: it takes our QDQ symbolics as written (its deprecation and opset-21 notices
        # are not the user's concern)
        warnings.simplefilter("ignore")
        torch.onnx.export(exported, check_batch[:1], buffer, dynamo=False, opset_version=OPSET_INT16 if wide else OPSET,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    _bypass_identities(proto.graph)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value, default=str))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _bypass_identities(graph: Any) -> None:
    """Drop the Identity nodes the exporter puts between an initializer and its consumer, so every weight
    DequantizeLinear reads its int8 initializer directly (the pattern QDQ-aware runtimes look for)."""
    initializers = {tensor.name for tensor in graph.initializer}
    outputs = {output.name for output in graph.output}
    renamed = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            renamed[node.output[0]] = node.input[0]
            graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]


@dataclass
class OnnxExportResult:
    path: Path
    file_bytes: int
    opset: int
    nodes: dict[str, int]
    layers: int
    seconds: float


def export_onnx_run(run_dir: str | Path, out: str | Path | None = None, data_dir: str | None = None) -> OnnxExportResult:
    """``quantbench export RUN_DIR --format onnx``: write ``RUN_DIR/export/model.onnx`` (or ``out``) atomically."""
    from quantbench.training.rebuild import first_test_batch, load_run

    onnx, _ = require_onnx()
    started = time.perf_counter()
    run = load_run(run_dir, data_dir)
    metadata = {"quantbench_run": str(run.directory), "quantbench_train": vars(run.config)}
    data = onnx_bytes(run.model, first_test_batch(run.data, 256)[0], metadata)
    path = Path(out) if out is not None else run.directory / ONNX_EXPORT
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    proto = onnx.load_from_string(data)
    nodes: dict[str, int] = {}
    for node in proto.graph.node:
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
    return OnnxExportResult(path, path.stat().st_size, proto.opset_import[0].version, nodes,
                            len(quantized_layers(run.model)), time.perf_counter() - started)


# ---- ONNX Runtime ------------------------------------------------------------------------------------------------


def session(model: str | Path | bytes) -> Any:
    """An ONNX Runtime session on the CPU execution provider (default graph optimizations, as users run it)."""
    _, onnxruntime = require_onnx()
    source = str(model) if isinstance(model, (str, Path)) else model
    try:
        return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - a bad or foreign file: one line, not the runtime's traceback
        message = " ".join(str(error).split())[:200]
        raise QuantbenchError(f"ONNX Runtime cannot load {model if isinstance(model, (str, Path)) else 'the model'}: "
                              f"{message}; rewrite it with quantbench export RUN_DIR --format onnx") from None


def onnx_logits(model: str | Path | bytes, loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Logits and labels over ``loader`` through ONNX Runtime."""
    runtime = session(model)
    name = runtime.get_inputs()[0].name
    outputs, labels = [], []
    for images, target in loader:
        outputs.append(torch.from_numpy(runtime.run(None, {name: images.numpy()})[0]))
        labels.append(target)
    return torch.cat(outputs), torch.cat(labels)


def _recorded_train(path: Path) -> dict[str, Any]:
    """The run's train config that :func:`export_onnx_run` wrote into the file's metadata."""
    onnx, _ = require_onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends: a damaged or foreign file
        raise QuantbenchError(f"ONNX cannot read {path} ({type(error).__name__}); write it again with quantbench "
                              "export RUN_DIR --format onnx") from None
    recorded = {prop.key: prop.value for prop in proto.metadata_props}.get("quantbench_train")
    if recorded is None:
        raise QuantbenchError(f"{path} has no quantbench metadata (not written by quantbench export --format onnx); "
                              "give the run directory instead")
    return json.loads(recorded)


def evaluate_onnx(run_dir: str | Path, compare: bool = False, export: str | Path | None = None,
                  data_dir: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """``quantbench evaluate --path onnx``: top-1/top-5 of the test set through ONNX Runtime; with ``compare``, also
    through the fake-quantized model and how closely the two agree. ``run_dir`` may be an ``.onnx`` file (onnx path
    only); a run without ``export/model.onnx`` is exported in memory."""
    from quantbench.data import create_dataset
    from quantbench.export.integer_model import compare_logits, logits_of, tie_diagnostics
    from quantbench.training.rebuild import first_test_batch, load_run
    from quantbench.utils.modules import accuracy

    source = Path(run_dir)
    if not source.exists():
        raise QuantbenchError(f"{run_dir}: no such run directory or ONNX file")
    if source.is_file() and compare:
        raise QuantbenchError(f"{run_dir} is an ONNX file: only --path onnx runs from it (give the run directory to --compare)")
    model_path = source if source.is_file() else Path(export) if export else source / ONNX_EXPORT
    if export is not None and not model_path.is_file():
        raise QuantbenchError(f"--export {export}: no such file; write it with quantbench export RUN_DIR --format onnx --out {export}")
    run = load_run(source, data_dir) if compare or not model_path.is_file() else None
    results: dict[str, Any] = {"run": str(source)}
    if model_path.is_file():
        model: str | Path | bytes = model_path
        results["export"] = str(model_path)
    else:
        model = onnx_bytes(run.model, first_test_batch(run.data, 256)[0])
        results["export"] = "built in memory (no model.onnx; write one with quantbench export --format onnx)"
    if run is not None:
        data = run.data
    else:
        train = _recorded_train(model_path)
        data = create_dataset(train["dataset"], data_dir=data_dir or train.get("data_dir"))
    loader = DataLoader(data.test, batch_size=batch_size, shuffle=False)
    started = time.perf_counter()
    logits, labels = onnx_logits(model, loader)
    results["onnx"] = accuracy(logits, labels)
    if compare:
        fake, _ = logits_of(run.model, loader)
        results["fake"] = accuracy(fake, labels)
        results["comparison"] = {**compare_logits(fake, logits), **tie_diagnostics(run.model, loader, fake, logits)}
    results["images"] = int(labels.numel())
    results["seconds"] = time.perf_counter() - started
    return results
