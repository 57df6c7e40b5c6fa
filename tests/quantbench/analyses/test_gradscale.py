"""quantbench gradscale (LSQ Figure 4): a tiny configuration end to end, the maths of R, N, the window and bad input."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from quantbench import cli
from quantbench.analyses import figure4, gradscale
from quantbench.data import create_dataset
from quantbench.errors import QuantbenchError
from quantbench.models import create_model
from quantbench.qat import QuantConfig, quantize_

BATCH = 32
TINY = ["--dataset", "digits", "--model", "small_cnn", "--bits", "2,4", "--iters", "4", "--batch-size", str(BATCH),
        "--threads", "1"]
SCALE_NAMES = [name for name, _, _ in gradscale.SCALES]


@pytest.fixture(scope="module")
def tiny_cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradscale")
    result = CliRunner().invoke(cli.app, ["gradscale", *TINY, "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result.output


@pytest.fixture(scope="module")
def per_sample_run():
    config = gradscale.GradScaleConfig(dataset="digits", model="small_cnn", bits=[2], iters=2, batch_size=BATCH,
                                       quantizer_options={"activation_n": "sample"}, threads=1)
    return gradscale.measure_gradscale(config)


def input_and_weight_numels(batch: int) -> dict[str, tuple[int, int]]:
    """Per Conv2d/Linear of small_cnn on a digits batch: (input numel, weight numel), by forward pre-hooks."""
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    images = next(iter(torch.utils.data.DataLoader(create_dataset("digits").train, batch_size=batch)))[0]
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(name, (inputs[0].numel(), module.weight.numel()))

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_pre_hook(lambda m, inputs, name=name: record(name, m, inputs))
    model(images)
    return seen


def test_tiny_cli_run_writes_csv_json_and_figure(tiny_cli_run):
    out, output = tiny_cli_run
    df = pd.read_csv(out / "figure4.csv")
    assert list(df.columns[:5]) == ["layer", "kind", "bits", "scale", "R"]
    assert set(df["scale"]) == set(SCALE_NAMES)
    assert set(df["bits"]) == {2, 4} and set(df["kind"]) == {"weight", "activation"}
    assert (df["R"] > 0).all() and df["R"].map(math.isfinite).all()
    assert (df["iterations"] == 4).all()
    # every (layer, kind, bits) has exactly one row per scale; 4 LSQ layers, first and last at 8 bits
    assert (df.groupby(["layer", "kind", "bits"]).size() == 3).all()
    assert len(df) == 4 * 2 * 2 * 3
    assert set(df.loc[df["position"] != "body", "layer_bits"]) == {8}
    assert (df.loc[df["position"] == "body", "layer_bits"] == df.loc[df["position"] == "body", "bits"]).all()
    meta = json.loads((out / "figure4.json").read_text())
    epoch = len(create_dataset("digits").train) // BATCH
    assert [run["window"] for run in meta["runs"]] == [[epoch // 2 - 2, epoch // 2 + 2]] * 2
    assert meta["command"].startswith("quantbench gradscale --dataset digits --model small_cnn --bits 2,4 --iters 4")
    assert set(meta["medians"]) == set(SCALE_NAMES)
    assert set(meta["claims"]) == {"weight", "activation"}
    assert {"claim1", "claim2", "claim3"} <= set(meta["claims"]["weight"])
    reread = figure4.read_figure4(out)
    assert reread.attrs["runs"] == meta["runs"]
    assert figure4.medians(reread)["R"].tolist() == pytest.approx(figure4.medians(df)["R"].tolist())
    for suffix in (".png", ".svg"):
        assert (out / f"figure4{suffix}").stat().st_size > 1000
    assert "1/sqrt(N*Qp)" in output  # the medians table is printed


def test_scaled_r_is_unscaled_r_times_g_for_every_row(tiny_cli_run):
    out, _ = tiny_cli_run
    df = pd.read_csv(out / "figure4.csv")  # written with 10 significant digits
    wide = df.pivot_table(index=["layer", "kind", "bits", "n", "qp"], columns="scale", values="R").reset_index()
    for _, row in wide.iterrows():
        assert row["1/sqrt(N*Qp)"] == pytest.approx(row["1"] / math.sqrt(row["n"] * row["qp"]), rel=1e-8)
        assert row["1/sqrt(N)"] == pytest.approx(row["1"] / math.sqrt(row["n"]), rel=1e-8)


def test_scaled_r_exact_in_memory_and_activation_n_per_sample(per_sample_run):
    df = per_sample_run
    wide = df.pivot_table(index=["layer", "kind", "bits", "n", "qp"], columns="scale", values="R").reset_index()
    for _, row in wide.iterrows():
        assert row["1/sqrt(N*Qp)"] == pytest.approx(row["1"] / math.sqrt(row["n"] * row["qp"]), rel=1e-12)
    numels = input_and_weight_numels(BATCH)
    for _, row in df.iterrows():
        input_numel, weight_numel = numels[row["layer"]]
        expected = weight_numel if row["kind"] == "weight" else input_numel // BATCH
        assert row["n"] == expected, row.to_dict()


def test_activation_n_is_the_batch_numel_by_default(tiny_cli_run):
    out, _ = tiny_cli_run
    df = pd.read_csv(out / "figure4.csv")
    numels = input_and_weight_numels(BATCH)
    for _, row in df.iterrows():
        input_numel, weight_numel = numels[row["layer"]]
        assert row["n"] == (weight_numel if row["kind"] == "weight" else input_numel), row.to_dict()


def test_unscaled_ratio_from_full_scale_grad_matches_a_model_trained_without_scale():
    """Dividing the observed step gradient by g gives what grad_scale="none" computes directly."""
    torch.manual_seed(0)
    base = create_model("small_cnn", num_classes=10, in_channels=1)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    models = {}
    for mode in ("full", "none"):
        model = copy.deepcopy(base)
        quantize_(model, QuantConfig("lsq", bits=3, options={"grad_scale": mode}), images)
        F.cross_entropy(model(images), labels).backward()
        models[mode] = model
    full = gradscale._unscaled_ratios(gradscale._probes(models["full"]))
    none_probes = gradscale._probes(models["none"])
    assert all(p.quantizer.grad_scale == "none" for p in none_probes)
    direct = [
        (abs(float(p.quantizer.step_size.grad)) / float(p.quantizer.effective_step().detach()))
        / (float(p.weight.grad.norm()) / float(p.weight.detach().norm()))
        for p in none_probes
    ]
    assert len(full) == len(direct) == 8 and all(value > 0 for value in direct)
    assert full == pytest.approx(direct, rel=1e-5)


def test_window_is_centred_on_the_middle_of_the_epoch():
    assert gradscale.measurement_window(937, 500) == (218, 718)
    assert gradscale.measurement_window(44, 4) == (20, 24)
    assert gradscale.measurement_window(10, 10) == (0, 10)
    with pytest.raises(QuantbenchError, match="does not fit in one epoch of 468 iterations"):
        gradscale.measurement_window(468, 500)


def test_only_lsq_quantizers_are_accepted():
    with pytest.raises(QuantbenchError, match="not LSQ"):
        gradscale.GradScaleConfig(quantizer="pact").resolved()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--iters", "0"], "--iters must be at least 1"),
        (["--dataset", "mnist-ish"], "unknown dataset 'mnist-ish'"),
        (["--iters", "500"], "does not fit in one epoch"),
        (["--bits", "1"], "out of range"),
        (["--quantizer", "pact"], "not LSQ"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, cli_error, tmp_path):
    assert message in cli_error(["gradscale", "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()
