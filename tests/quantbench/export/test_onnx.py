"""ONNX QDQ export checked in ONNX Runtime: on digits runs of every uniform quantizer the runtime's predictions equal the
fake-quantized model's on the whole test set, the graph is QuantizeLinear/DequantizeLinear with int8 weight
initializers, and what ONNX cannot hold is refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import quantizers
from quantbench.errors import QuantbenchError
from quantbench.export.integer_model import evaluate_paths
from quantbench.export.onnx import export_onnx_run, onnx_bytes
from quantbench.models import create_model
from quantbench.qat import QuantConfig, quantize_, quantized_layers
from quantbench.training.rebuild import load_run
from tests.helpers import assert_one_line

onnx = pytest.importorskip("onnx")
numpy_helper = onnx.numpy_helper

QUANTIZED = [("lsq", 2), ("lsq", 4), ("fixed", 2), ("pact", 2), ("qil", 2)]
PER_CHANNEL = [("lsq-per-channel", 4), ("lsq-per-channel", 2)]  # lsq, one weight step per output channel


def _graph(path: Path) -> tuple[object, dict[str, object]]:
    model = onnx.load(str(path))
    return model, {tensor.name: tensor for tensor in model.graph.initializer}


@pytest.mark.parametrize("name,bits", QUANTIZED + PER_CHANNEL)
def test_onnx_runtime_reproduces_the_fake_quantized_model(runs, name: str, bits: int) -> None:
    run_dir = runs[(name, bits)]
    in_memory = evaluate_paths(run_dir, paths=("onnx",))  # no model.onnx yet: exported in memory
    assert in_memory["export"].startswith("built in memory")
    exported = export_onnx_run(run_dir)
    assert exported.path == run_dir / "export" / "model.onnx"
    results = evaluate_paths(run_dir, paths=("fake", "onnx"))
    assert results["export"] == str(exported.path)
    comparison = results["comparison"]
    assert results["images"] == comparison["images"] == 360  # the whole digits test set
    assert comparison["predictions_differing"] == 0 and results["fake"] == results["onnx"] == in_memory["onnx"]
    # rtol 1e-5, atol 1e-5 * max |logit| on every image, except one whose fake-quantized activations sit within
    # float32 rounding of a rounding tie (ONNX Runtime sums in another order: a code may flip there, as on AVX-512)
    assert comparison["images_not_close_without_tie"] == 0, comparison
    assert results["fake"]["top1"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["top1"])


@pytest.mark.parametrize("name,bits", [("lsq", 2), ("qil", 2), ("pact", 2)])
def test_graph_is_qdq_with_integer_weight_initializers(runs, name: str, bits: int, tmp_path: Path) -> None:
    run_dir = runs[(name, bits)]
    path = export_onnx_run(run_dir, out=tmp_path / "m.onnx").path
    model, initializers = _graph(path)
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" in ops  # --bn float: BN stays a float op after the conv, as in the paper
    layers = quantized_layers(load_run(run_dir).model)
    assert ops.count("QuantizeLinear") == len(layers)  # one per quantized layer's input
    assert ops.count("DequantizeLinear") == 2 * len(layers)  # its input and its weights
    weights = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            codes = numpy_helper.to_array(initializers[node.input[0]])
            step = float(numpy_helper.to_array(initializers[node.input[1]]))
            weights[codes.shape] = torch.from_numpy(codes.astype("float64")) * step
    assert len(weights) == len(layers)
    for _, layer in layers:
        fake = layer.weight_quantizer(layer.weight).detach().double()
        # the codes times their step are the fake-quantized weights (QIL: gamma baked in)
        torch.testing.assert_close(weights[tuple(layer.weight.shape)], fake, rtol=1e-6, atol=1e-7)
    dtypes = [initializers[node.input[0]].data_type for node in model.graph.node
              if node.op_type == "DequantizeLinear" and node.input[0] in initializers]
    if name == "pact":  # DoReFa's odd codes need int16 in the 8-bit first and last layers (opset 21)
        assert sorted(dtypes) == [onnx.TensorProto.INT8] * 2 + [onnx.TensorProto.INT16] * 2
        assert model.opset_import[0].version == 21
    else:
        assert set(dtypes) == {onnx.TensorProto.INT8}
        assert model.opset_import[0].version == 17
    # no float copy of a quantized weight is left in the file
    shapes = {tuple(layer.weight.shape) for _, layer in layers}
    assert not [t.name for t in model.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in shapes]


def test_per_channel_weights_use_per_axis_dequantize_linear(runs, tmp_path: Path) -> None:
    run_dir = runs[("lsq-per-channel", 4)]
    model, initializers = _graph(export_onnx_run(run_dir, out=tmp_path / "m.onnx").path)
    onnx.checker.check_model(model, full_check=True)
    layers = quantized_layers(load_run(run_dir).model)
    weights = [node for node in model.graph.node
               if node.op_type == "DequantizeLinear" and node.input[0] in initializers]
    assert len(weights) == len(layers)
    by_shape = {}
    for node in weights:
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        assert attributes == {"axis": 0}  # the per-axis form
        codes = numpy_helper.to_array(initializers[node.input[0]])
        scale = numpy_helper.to_array(initializers[node.input[1]])
        assert codes.dtype.name == "int8" and scale.dtype.name == "float32"
        assert scale.shape == (codes.shape[0],)  # one step per output channel (C_out)
        by_shape[codes.shape] = (torch.from_numpy(codes.copy()), torch.from_numpy(scale.copy()))
    for _, layer in layers:
        codes, scale = by_shape[tuple(layer.weight.shape)]
        assert torch.equal(scale, layer.weight_quantizer.step_size.detach().abs())
        fake = layer.weight_quantizer(layer.weight).detach()
        # what DequantizeLinear computes, code * s_c in float32: the fake-quantized weights bit for bit
        assert torch.equal(codes.float() * scale.reshape((-1,) + (1,) * (codes.dim() - 1)), fake)
    # the activations' DequantizeLinear keep one step (no axis)
    activation = [node for node in model.graph.node
                  if node.op_type == "DequantizeLinear" and node.input[0] not in initializers]
    assert len(activation) == len(layers) and not any(node.attribute for node in activation)


def test_activations_use_uint8_after_relu_and_the_learned_step(runs, tmp_path: Path) -> None:
    run_dir = runs[("lsq", 4)]
    model, _ = _graph(export_onnx_run(run_dir, out=tmp_path / "m.onnx").path)
    constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t)
                 for node in model.graph.node if node.op_type == "Constant"}
    quantize = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    zero_types = [constants[node.input[2]].dtype.name for node in quantize]
    assert zero_types == ["int8", "uint8", "uint8", "uint8"]  # the normalized image is signed, the rest follow ReLU
    layers = quantized_layers(load_run(run_dir).model)
    steps = [float(constants[node.input[1]]) for node in quantize]
    assert steps == pytest.approx([layer.input_quantizer.current_step() for _, layer in layers], rel=1e-7)


def test_cli_export_and_evaluate_onnx(runs, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quantbench import cli

    run_dir = runs[("fixed", 2)]
    runner = CliRunner()
    result = runner.invoke(cli.app, ["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                                     "--json", str(tmp_path / "export.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "export.json").read_text())["nodes"]["QuantizeLinear"] == 4
    result = runner.invoke(cli.app, ["evaluate", str(run_dir), "--path", "onnx", "--compare", "--export",
                                     str(tmp_path / "m.onnx"), "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert "360/360" in result.output
    assert json.loads((tmp_path / "eval.json").read_text())["comparison"]["prediction_agreement"] == 100.0
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path / "m.onnx"), "--path", "onnx"])
    assert result.exit_code == 0 and "onnx     top1" in result.output, result.output


# ---- refusals ----------------------------------------------------------------------------------------------------


class _Logarithmic(quantizers.Quantizer):
    """Power-of-two levels: not a uniform grid, so no QuantizeLinear can hold it."""

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.register_buffer("step", torch.tensor(1.0))

    def quantize(self, v):
        exponent = torch.clamp(torch.round(torch.log2(v.abs().clamp_min(1e-12) / self.step)), 0, self.qp)
        return torch.sign(v) * self.step * 2**exponent

    def apply_step(self, step: float) -> None:
        self.step.fill_(step)
        self.mark_initialized()

    def levels(self):
        positive = self.step * 2 ** torch.arange(self.qp + 1.0)
        return torch.cat([-positive.flip(0), positive])


def _quantized(name: str, bits: int) -> tuple[torch.nn.Module, torch.Tensor]:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    sample = torch.randn(8, 1, 8, 8)
    quantize_(model, QuantConfig(name, bits=bits, first_last_bits=bits), sample)
    model.eval()
    with torch.no_grad():
        model(sample)  # initialize the steps
    return model, sample


def test_non_uniform_quantizer_is_refused_in_one_line() -> None:
    if "test-onnx-log" not in quantizers.available():
        quantizers.register("test-onnx-log")(_Logarithmic)
    model, sample = _quantized("test-onnx-log", 2)
    with pytest.raises(QuantbenchError) as error:
        onnx_bytes(model, sample)
    assert_one_line(error.value, "cannot export to ONNX", "not uniformly spaced")


def test_more_than_8_bits_is_refused_in_one_line() -> None:
    model, sample = _quantized("lsq", 10)
    with pytest.raises(QuantbenchError) as error:
        onnx_bytes(model, sample)
    assert_one_line(error.value, "10-bit", "2..8")


def test_missing_onnx_names_the_extra(monkeypatch: pytest.MonkeyPatch, runs, cli_error) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it raises ImportError
    message = cli_error(["export", str(runs[("lsq", 2)]), "--format", "onnx"])
    assert "pip install quantbench[export]" in message


def test_pack_and_unknown_format_are_one_line_errors(runs, cli_error) -> None:
    assert "--pack applies to --format integer" in cli_error(["export", str(runs[("lsq", 2)]), "--format", "onnx", "--pack"])
    assert "--format must be integer or onnx" in cli_error(["export", str(runs[("lsq", 2)]), "--format", "tflite"])


def test_adaptive_pools_become_the_equal_fixed_window_or_a_one_line_error() -> None:
    """small_cnn on 28x28 Fashion-MNIST pools 3x3 to 2x2, which the ONNX exporter cannot take as adaptive pooling:
    the export rewrites it as the AvgPool2d it equals at the dataset's input size, and refuses uneven windows."""
    import torch
    from torch import nn

    from quantbench.errors import QuantbenchError
    from quantbench.export.onnx import fixed_adaptive_pools

    for size, out in ((3, 2), (8, 1), (5, 2), (28, (2, None))):
        model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(out), nn.Flatten())
        x = torch.randn(2, 1, size, size)
        expected = model(x)
        fixed_adaptive_pools(model, x[:1])
        assert isinstance(model[1], nn.AvgPool2d) and torch.allclose(model(x), expected)
    uneven = nn.Sequential(nn.AdaptiveAvgPool2d(4))
    with pytest.raises(QuantbenchError, match="uneven windows"):
        fixed_adaptive_pools(uneven, torch.randn(1, 1, 6, 6))
