"""BatchNorm folding in QAT (``--bn fold``): the folded conv computes what conv + BN compute, trains with the
quantizer seeing the folded weights, freezes its statistics on request, and deploys (ONNX) without a BatchNorm."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantbench.config import TrainConfig
from quantbench.errors import QuantbenchError
from quantbench.models import create_model
from quantbench.qat import QuantConfig, quantize_, quantized_layers
from quantbench.qat_bnfold import (ConvBn2d, FoldedBatchNorm2d, QuantConvBn2d, deployable,
                                   fold_bn_, foldable_pairs, set_bn_frozen)
from quantbench.training.rebuild import load_run
from quantbench.training.run import train
from tests.helpers import assert_one_line


def _small_cnn_with_statistics() -> nn.Module:
    """small_cnn whose BNs hold non-trivial running statistics and affine parameters (not the identity at init)."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(5):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def test_folded_forward_equals_conv_then_bn_before_training() -> None:
    model = _small_cnn_with_statistics()
    folded = copy.deepcopy(model)
    assert fold_bn_(folded) == [("features.0", "features.1"), ("features.4", "features.5"), ("features.8", "features.9")]
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)  # running statistics
        # training: batch statistics with the running-statistics correction give BN(conv(x)) again
        torch.testing.assert_close(copy.deepcopy(folded).train()(x), copy.deepcopy(model).train()(x), rtol=1e-4, atol=1e-4)
    assert folded.state_dict().keys() == model.state_dict().keys()  # same checkpoint keys as --bn float
    assert isinstance(folded.features[1], FoldedBatchNorm2d) and isinstance(folded.features[0], ConvBn2d)
    deployed = deployable(folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    with torch.no_grad():
        assert torch.equal(deployed(x), folded.eval()(x))  # the deployed form is the eval computation itself


def test_weight_quantizer_sees_the_folded_weights() -> None:
    model = _small_cnn_with_statistics()
    sample = torch.randn(8, 1, 8, 8)
    quantize_(model, QuantConfig("lsq", bits=4), sample)
    fold_bn_(model)
    layer = model.features[4]
    assert isinstance(layer, QuantConvBn2d) and dict(quantized_layers(model))["features.4"] is layer
    folded_weight, _ = layer.folded_parameters()  # from the running statistics before this batch updates them
    lsq_init = 2 * folded_weight.detach().abs().mean() / 7 ** 0.5  # LSQ's init, 2 mean|w| / sqrt(Q_P)
    model.train()
    model(sample)  # quantizers initialize on their first forward: the weight step from the folded weights
    assert layer.weight_quantizer.current_step() == pytest.approx(float(lsq_init), rel=1e-5)


def test_frozen_statistics_stop_updating() -> None:
    model = _small_cnn_with_statistics()
    fold_bn_(model)
    model.train()
    bn = model.features[1]
    before = bn.running_mean.clone()
    set_bn_frozen(model, TrainConfig(bn="fold", freeze_bn_epoch=1), epoch=0)
    model(torch.randn(8, 1, 8, 8) + 3)
    assert not torch.equal(bn.running_mean, before)  # epoch 0: batch statistics, running ones updated
    set_bn_frozen(model, TrainConfig(bn="fold", freeze_bn_epoch=1), epoch=1)
    frozen = bn.running_mean.clone()
    model(torch.randn(8, 1, 8, 8) + 3)
    assert torch.equal(bn.running_mean, frozen)


def test_preactivation_resnets_fold_only_the_conv_bn_pairs_inside_blocks() -> None:
    pairs = foldable_pairs(create_model("preact_resnet20", num_classes=10, in_channels=3))
    # BN-ReLU-conv1-BN-ReLU-conv2 blocks: conv1 -> bn2 folds; conv2 and the CIFAR stem feed residual sums
    assert pairs == [(f"stages.{s}.{b}.conv1", f"stages.{s}.{b}.bn2") for s in range(3) for b in range(3)]
    assert len(foldable_pairs(create_model("resnet18", num_classes=10, in_channels=3))) == 20  # every conv


def test_nothing_to_fold_and_bad_settings_are_one_line_errors() -> None:
    class BnBeforeConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(self.bn(x))

    with pytest.raises(QuantbenchError) as error:
        fold_bn_(BnBeforeConv(), "bn_before_conv")
    assert_one_line(error.value, "bn_before_conv has no conv followed directly by a BatchNorm2d", "--bn float")
    with pytest.raises(QuantbenchError) as error:
        TrainConfig(bn="folded")  # validated once, when the config is built
    assert_one_line(error.value, "--bn must be one of float, fold")
    with pytest.raises(QuantbenchError) as error:
        TrainConfig(bn="fold", sync_bn=True)
    assert_one_line(error.value, "--sync-bn", "--bn float")


def test_fold_trains_evaluates_and_exports_to_onnx_without_batchnorm(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from quantbench.export.integer_model import evaluate_paths
    from quantbench.export.onnx import export_onnx_run

    common = {"dataset": "digits", "model": "small_cnn", "epochs": 1, "threads": 1}
    train(TrainConfig(out=str(tmp_path / "fp"), **common), progress=False)
    run_dir = tmp_path / "fold"
    metrics = train(TrainConfig(out=str(run_dir), quantizer="lsq", bits=4, init_from=str(tmp_path / "fp"), bn="fold",
                                **{**common, "epochs": 2}, freeze_bn_epoch=1), progress=False)
    assert metrics["top1"] > 50  # it learns (10 classes)
    model = load_run(run_dir).model
    assert sum(isinstance(m, QuantConvBn2d) for m in model.modules()) == 3
    exported = export_onnx_run(run_dir)
    ops = [node.op_type for node in onnx.load(str(exported.path)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") == 4
    results = evaluate_paths(run_dir, paths=("fake", "onnx"))
    assert results["comparison"]["predictions_differing"] == 0 and results["comparison"]["images"] == 360
    assert results["fake"]["top1"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["top1"])


def test_compare_sweeps_bn_like_other_recipe_settings(tmp_path: Path) -> None:
    from quantbench.comparison.compare import build_config, plan

    config = build_config(None, {"quantizers": ["lsq"], "bits": [2], "seeds": [0], "bn": ["float", "fold"],
                                 "out": str(tmp_path)})
    runs = {run.name: run for run in plan(config)}
    assert runs["fp-seed0"].config.bn == "float"  # the baseline trains the paper's float BN; cells fold from it
    folded = [run for run in runs.values() if run.config.bn == "fold"]
    assert len(folded) == 1 and folded[0].row["variant"] == "bn=fold"
    assert {run.config.bn for run in runs.values() if run.config.quantizer} == {"float", "fold"}


def test_folding_warns_for_a_weight_grid_without_zero() -> None:
    """DoReFa's grid (PACT's weights) has no zero level: folded, small channels pin and their BN scale collapses
    (reports/bn-fold/README.md, experiments/bn_fold_probe.py); LSQ's grid has zero and folds quietly."""
    import warnings

    from quantbench.config import TrainConfig
    from quantbench.data import create_dataset
    from quantbench.training.run import build_model

    data = create_dataset("digits")
    sample = torch.randn(8, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="no zero level"):
        build_model(TrainConfig(quantizer="pact", bits=2, bn="fold"), data, sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        build_model(TrainConfig(quantizer="lsq", bits=2, bn="fold"), data, sample)
        build_model(TrainConfig(quantizer="pact", bits=2, bn="fold", quantizer_options={"weight_scheme": "symmetric"}),
                    data, sample)
