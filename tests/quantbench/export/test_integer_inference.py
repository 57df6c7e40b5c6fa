"""Integer inference (LSQ Figure 1): export a trained run as integer codes and check that integer codes x integer codes,
accumulated in int32 and rescaled by s_w * s_x, reproduce the fake-quantized model on the whole digits test set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import quantizers
from quantbench import cli
from quantbench.errors import QuantbenchError
from quantbench.export.integer import build_export, export_run, pack_codes, read_export, unpack_codes
from quantbench.export.integer_model import IntegerLayer, evaluate_paths, integer_model
from quantbench.training.rebuild import load_run
from quantbench.models import create_model
from quantbench.qat import QuantConfig, quantize_, quantized_layers

QUANTIZED = [("lsq", 2), ("lsq", 4), ("fixed", 2), ("qil", 2), ("pact", 2)]
PER_CHANNEL = [("lsq-per-channel", 4), ("lsq-per-channel", 2)]  # lsq, one weight step per output channel


@pytest.mark.parametrize("name,bits", QUANTIZED + PER_CHANNEL)
def test_integer_path_reproduces_the_fake_quantized_model(runs, name: str, bits: int) -> None:
    run_dir = runs[(name, bits)]
    exported = export_run(run_dir)
    assert exported.path == run_dir / "export" / "model.int.pt"
    assert exported.file_bytes < exported.fp_bytes / 2  # int8 codes instead of float32 weights
    results = evaluate_paths(run_dir)  # both paths, the integer one from the export file
    assert results["export"] == str(exported.path)
    comparison = results["comparison"]
    assert results["images"] == comparison["images"] == 360  # the whole digits test set
    assert comparison["predictions_differing"] == 0 and results["fake"] == results["integer"]
    # rtol 1e-5, atol 1e-5 * max |logit| on every image, except one whose activations sit within float32 rounding of
    # a rounding tie, where the exact integer sum and the float32 one may round apart (seen under ATEN avx2 kernels)
    assert comparison["images_not_close_without_tie"] == 0, comparison
    assert comparison["layer_max_rel_diff"] < 1e-5  # float32 rounding only
    # the fake path is the trained model: same accuracy as the run recorded
    assert results["fake"]["top1"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["top1"])


def test_export_holds_int8_codes_steps_and_the_model_description(runs) -> None:
    run_dir = runs[("lsq", 2)]
    path = export_run(run_dir, out=run_dir / "codes.pt").path
    payload = read_export(path)
    assert payload["description"]["train"]["quantizer"] == "lsq" and payload["description"]["train"]["bits"] == 2
    model = load_run(run_dir).model
    for name, layer in quantized_layers(model):
        entry = payload["layers"][name]
        codes = entry["weight_codes"]
        assert codes.dtype == torch.int8
        quantizer = layer.weight_quantizer
        assert -quantizer.qn <= int(codes.min()) and int(codes.max()) <= quantizer.qp
        assert entry["weight_step"] == float(quantizer.step_size.detach().abs())
        assert entry["input"]["step"] == float(layer.input_quantizer.step_size.detach().abs())
        # codes times the step are the fake-quantized weights
        torch.testing.assert_close(codes.double() * entry["weight_step"], quantizer(layer.weight).detach().double())
    assert not any("_quantizer." in key for key in payload["float_state"])


@pytest.mark.parametrize("pack", [False, True])
def test_per_channel_export_holds_one_step_per_output_channel(runs, pack: bool) -> None:
    run_dir = runs[("lsq-per-channel", 4)]
    path = export_run(run_dir, out=run_dir / f"per-channel-{pack}.pt", pack=pack).path
    payload = read_export(path)  # weights_only: the per-channel steps are a plain float64 tensor
    model = load_run(run_dir).model
    integer_layers = {n: m for n, m in integer_model(payload).named_modules() if isinstance(m, IntegerLayer)}
    for name, layer in quantized_layers(model):
        entry = payload["layers"][name]
        quantizer = layer.weight_quantizer
        channels = layer.weight.shape[0]
        steps = entry["weight_step"]
        assert steps.dtype == torch.float64 and steps.shape == (channels,)
        assert torch.equal(steps, quantizer.step_size.detach().abs().double())  # the float32 steps, exactly
        assert len(set(steps.tolist())) > 1  # really one step per channel
        assert isinstance(entry["input"]["step"], float)  # activations keep one step
        codes = integer_layers[name].weight_codes
        assert -quantizer.qn <= int(codes.min()) and int(codes.max()) <= quantizer.qp
        fake = quantizer(layer.weight).detach()
        view = (-1,) + (1,) * (fake.dim() - 1)
        # codes[c] x s_w[c] is each channel's fake-quantized weights, bit for bit in float32 (the forward's product)
        assert torch.equal(codes.float() * steps.float().reshape(view), fake)
        if not pack:
            assert entry["weight_codes"].dtype == torch.int8


def test_per_channel_rescale_is_per_output_channel(runs) -> None:
    run_dir = runs[("lsq-per-channel", 2)]
    payload = read_export(export_run(run_dir, out=run_dir / "rescale.pt").path)
    for name, entry in payload["layers"].items():
        layer = IntegerLayer(entry)
        expected = entry["weight_step"] * entry["input"]["step"]  # float64, one per output channel
        assert torch.equal(layer.rescale.flatten(), expected)
        assert layer.rescale.dtype == torch.float64 and "ch" in layer.extra_repr()


def test_cli_export_and_evaluate_per_channel(runs, tmp_path: Path) -> None:
    run_dir = runs[("lsq-per-channel", 4)]
    runner = CliRunner()
    result = runner.invoke(cli.app, ["export", str(run_dir), "--out", str(tmp_path / "m.pt"), "--json",
                                     str(tmp_path / "size.json")])
    assert result.exit_code == 0, result.output
    size = json.loads((tmp_path / "size.json").read_text())
    assert all(isinstance(row["weight_step"], list) for row in size["layers"])  # per-channel steps in the JSON
    result = runner.invoke(cli.app, ["evaluate", str(run_dir), "--compare", "--export", str(tmp_path / "m.pt"),
                                     "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["comparison"]["predictions_differing"] == 0


def test_qil_with_learned_gamma_runs_on_integers(runs) -> None:
    model = load_run(runs[("qil", 2)]).model
    gammas = [float(layer.weight_quantizer.gamma.detach()) for _, layer in quantized_layers(model)]
    assert any(abs(gamma - 1.0) > 1e-4 for gamma in gammas)  # training moved gamma off 1
    # ...and test_integer_path_reproduces_the_fake_quantized_model[qil-2] passed on this very run


def test_packed_export_gives_the_same_integer_model(runs) -> None:
    run_dir = runs[("lsq", 2)]
    plain = export_run(run_dir, out=run_dir / "plain.pt")
    packed = export_run(run_dir, out=run_dir / "packed.pt", pack=True)
    assert packed.file_bytes < plain.file_bytes
    a = evaluate_paths(run_dir / "plain.pt", paths=("integer",))
    b = evaluate_paths(run_dir / "packed.pt", paths=("integer",))
    assert a["integer"] == b["integer"]
    layers_a = {n: m.weight_codes for n, m in integer_model(read_export(run_dir / "plain.pt")).named_modules()
                if isinstance(m, IntegerLayer)}
    layers_b = {n: m.weight_codes for n, m in integer_model(read_export(run_dir / "packed.pt")).named_modules()
                if isinstance(m, IntegerLayer)}
    assert all(torch.equal(layers_a[n], layers_b[n]) for n in layers_a)


@pytest.mark.parametrize("lo,hi,stride,bits", [(-2, 1, 1, 2), (0, 15, 1, 4), (-128, 127, 1, 8), (-7, 7, 2, 3)])
def test_bit_packing_round_trips(lo: int, hi: int, stride: int, bits: int) -> None:
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, (hi - lo) // stride + 1, (1001,), generator=generator) * stride + lo
    packed = pack_codes(codes, lo, stride, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, 1001, lo, stride, bits), codes)


def test_cli_export_and_evaluate(runs, tmp_path: Path) -> None:
    run_dir = runs[("fixed", 2)]
    runner = CliRunner()
    result = runner.invoke(cli.app, ["export", str(run_dir), "--out", str(tmp_path / "m.pt"), "--json",
                                     str(tmp_path / "size.json")])
    assert result.exit_code == 0, result.output
    size = json.loads((tmp_path / "size.json").read_text())
    assert size["file_bytes"] < size["fp32_state_dict_bytes"]
    result = runner.invoke(cli.app, ["evaluate", str(run_dir), "--compare", "--export", str(tmp_path / "m.pt"),
                                     "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert "360/360" in result.output
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["comparison"]["prediction_agreement"] == 100.0
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path / "m.pt"), "--path", "integer"])
    assert result.exit_code == 0 and "integer  top1" in result.output


# ---- quantizers that cannot run on integers ---------------------------------------------------------------------


class _NoIntegerSpec(quantizers.Quantizer):
    """A uniform quantizer that says nothing about integers (a plugin)."""

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.register_buffer("step", torch.tensor(1.0))

    def quantize(self, v):
        return torch.clamp(torch.round(v / self.step), -self.qn, self.qp) * self.step

    def apply_step(self, step: float) -> None:
        self.step.fill_(step)
        self.mark_initialized()

    def levels(self):
        return torch.arange(-self.qn, self.qp + 1) * self.step


class _WithIntegerSpec(_NoIntegerSpec):
    def integer_spec(self) -> quantizers.IntegerSpec:
        step = float(self.step)
        return quantizers.IntegerSpec(step, -self.qn, self.qp, width=step)


class _Logarithmic(_NoIntegerSpec):
    """Power-of-two levels: not a uniform grid."""

    def quantize(self, v):
        exponent = torch.clamp(torch.round(torch.log2(v.abs().clamp_min(1e-12) / self.step)), 0, self.qp)
        return torch.sign(v) * self.step * 2**exponent

    def levels(self):
        positive = self.step * 2 ** torch.arange(self.qp + 1.0)
        return torch.cat([-positive.flip(0), positive])


def _quantized_model(name: str, cls: type) -> tuple[torch.nn.Module, torch.Tensor]:
    if name not in quantizers.available():
        quantizers.register(name)(cls)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    sample = torch.randn(8, 1, 8, 8)
    quantize_(model, QuantConfig(name, bits=2), sample)
    model.eval()
    with torch.no_grad():
        model(sample)  # initialize the steps
    return model, sample


def test_quantizer_without_integer_codes_is_a_clear_error() -> None:
    model, sample = _quantized_model("test-integer-unknown", _NoIntegerSpec)
    with pytest.raises(QuantbenchError, match="cannot run on integers.*integer_spec"):
        build_export(model, {}, sample)
    model, sample = _quantized_model("test-integer-log", _Logarithmic)
    with pytest.raises(QuantbenchError, match="cannot run on integers: its levels are not uniformly spaced"):
        build_export(model, {}, sample)


def test_a_plugin_runs_on_integers_through_integer_spec() -> None:
    model, sample = _quantized_model("test-integer-spec", _WithIntegerSpec)
    payload = build_export(model, {"train": {"model": "small_cnn"}, "num_classes": 10, "in_channels": 1}, sample)
    with torch.no_grad():
        torch.testing.assert_close(integer_model(payload)(sample), model(sample), rtol=1e-5, atol=1e-5)


class _PerChannelWrongCount(_NoIntegerSpec):
    """A plugin whose weight spec gives per-channel steps that do not fit the weight's output channels."""

    def integer_spec(self) -> quantizers.IntegerSpec:
        step = float(self.step)
        if self.role == "weight":
            return quantizers.IntegerSpec([step] * 3, -self.qn, self.qp)
        return quantizers.IntegerSpec(step, -self.qn, self.qp, width=step)


def test_per_channel_steps_that_do_not_fit_the_channels_are_a_one_line_error() -> None:
    from tests.helpers import assert_one_line

    model, sample = _quantized_model("test-integer-per-channel-count", _PerChannelWrongCount)
    with pytest.raises(QuantbenchError) as error:
        build_export(model, {}, sample)
    assert_one_line(error.value, "3 per-channel steps", "output channels")
