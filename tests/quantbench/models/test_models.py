"""Tests of the model registry and every registered model: shapes, structure quantization relies on, weights files.

Inputs are kept small (8x8 to 64x64, batch 1-2) so the whole file runs in seconds on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import WeightsEnum

from quantbench.errors import QuantbenchError
from quantbench.models import PretrainedWeightsError, available_models, create_model, model_info

CIFAR_PREACT = ["preact_resnet20", "preact_resnet32", "preact_resnet56"]
IMAGENET_PREACT = ["preact_resnet18", "preact_resnet34", "preact_resnet50"]
TORCHVISION = ["resnet18", "resnet34", "resnet50", "vgg16_bn"]
OWN_FAMILIES = CIFAR_PREACT + IMAGENET_PREACT + ["small_cnn"]

#: (in_channels, side) of the smallest realistic input per model: VGG needs 32x32 for its five max-pools
INPUT_FOR = {name: (3, 32) for name in CIFAR_PREACT + ["small_cnn", "vgg16_bn"]}
INPUT_FOR.update({name: (3, 64) for name in IMAGENET_PREACT + ["resnet18", "resnet34", "resnet50"]})


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(autouse=True)
def deterministic_seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Run these tiny forwards on one thread: on a busy 2-core machine, thread hand-offs of intra-op parallelism
    cost milliseconds per layer (seconds per deep net) while tiny layers gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_lists_every_builtin_model_with_a_description() -> None:
    names = available_models()
    assert names == sorted(names)
    assert set(OWN_FAMILIES + TORCHVISION) <= set(names)
    for name in names:
        description = model_info(name)
        assert description and "\n" not in description


def test_unknown_model_names_the_available_ones_in_one_line() -> None:
    with pytest.raises(ValueError) as caught:
        create_model("resnet9000")
    message = str(caught.value)
    assert "\n" not in message and "resnet9000" in message
    assert all(name in message for name in OWN_FAMILIES + TORCHVISION)


@pytest.mark.parametrize("name", sorted(INPUT_FOR))
def test_every_model_maps_a_batch_to_logits(name: str) -> None:
    channels, side = INPUT_FOR[name]
    model = create_model(name, num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, channels, side, side))
    assert logits.shape == (1, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", OWN_FAMILIES + ["resnet18"])
@pytest.mark.parametrize("in_channels, side", [(1, 8), (1, 28)])
def test_grey_digits_and_fashion_mnist_sized_inputs_work(name: str, in_channels: int, side: int) -> None:
    model = create_model(name, num_classes=10, in_channels=in_channels)
    logits = model(torch.randn(2, in_channels, side, side))  # train mode: BatchNorm needs a batch of 2
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    "name, expected_millions",
    [("preact_resnet20", 0.27), ("preact_resnet32", 0.46), ("preact_resnet56", 0.85), ("small_cnn", 0.098)],
)
def test_cifar_scale_parameter_counts_match_the_papers(name: str, expected_millions: float) -> None:
    count = parameter_count(create_model(name, num_classes=10, in_channels=3 if name != "small_cnn" else 1))
    assert abs(count / 1e6 - expected_millions) / expected_millions < 0.03


def test_imagenet_preact_resnets_have_resnet_sized_parameter_counts() -> None:
    # Same convolutions as the post-activation nets (only BN placement differs), so counts match torchvision's.
    assert abs(parameter_count(create_model("preact_resnet18", num_classes=1000)) / 1e6 - 11.69) < 0.05
    assert abs(parameter_count(create_model("preact_resnet50", num_classes=1000)) / 1e6 - 25.55) < 0.05


def test_preact_resnet20_has_the_cifar_layout() -> None:
    model = create_model("preact_resnet20", num_classes=10)
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    # 1 stem + 9 blocks x 2 convs + 2 projection shortcuts (16->32, 32->64)
    assert len(convs) == 21 and len(linears) == 1
    assert {conv.out_channels for conv in convs} == {16, 32, 64}
    assert linears[0].in_features == 64


@pytest.mark.parametrize("name", OWN_FAMILIES)
def test_activations_are_relu_modules_each_called_once(name: str) -> None:
    model = create_model(name, num_classes=10)
    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    assert relus
    calls: dict[int, int] = {}

    def count_call(module: nn.Module, *_: object) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1

    hooks = [relu.register_forward_hook(count_call) for relu in relus]
    model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    # every ReLU module ran exactly once: no functional F.relu in between, no module shared between two places
    assert calls == {id(relu): 1 for relu in relus}
    activations = (nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardtanh, nn.Sigmoid, nn.Tanh)
    assert not any(isinstance(module, activations) for module in model.modules())


@pytest.mark.parametrize("name", OWN_FAMILIES + TORCHVISION)
def test_no_module_object_appears_twice_in_the_tree(name: str) -> None:
    # A shared module would make "replace every Conv2d/Linear with a quantized one" quantize two places with one
    # quantizer; each weighted layer and activation must be its own object.
    model = create_model(name, num_classes=10)
    modules = [module for _, module in model.named_modules(remove_duplicate=False)]
    assert len(modules) == len({id(module) for module in modules})


@pytest.mark.parametrize("name", OWN_FAMILIES)
def test_own_models_use_only_swappable_weighted_layers(name: str) -> None:
    model = create_model(name, num_classes=10)
    weighted = [module for module in model.modules() if list(module.parameters(recurse=False))]
    assert all(isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) for module in weighted)


def test_resnet18_loads_a_local_imagenet_state_dict_and_adapts_it(tmp_path: Path) -> None:
    source = create_model("resnet18", num_classes=1000, in_channels=3)
    weights_file = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights_file)

    same = create_model("resnet18", num_classes=1000, in_channels=3, pretrained=str(weights_file))
    for key, tensor in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], tensor), key

    adapted = create_model("resnet18", num_classes=10, in_channels=1, pretrained=weights_file)
    assert adapted.fc.out_features == 10 and adapted.conv1.in_channels == 1
    assert torch.equal(adapted.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    # the grey first conv responds to a grey image like the RGB conv does to the same image in RGB
    assert torch.allclose(adapted.conv1.weight[:, 0], source.conv1.weight.sum(dim=1), atol=1e-6)


def test_resnet18_reloads_its_own_adapted_checkpoint(tmp_path: Path) -> None:
    trained = create_model("resnet18", num_classes=10, in_channels=1)
    weights_file = tmp_path / "run.pth"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, weights_file)
    reloaded = create_model("resnet18", num_classes=10, in_channels=1, pretrained=weights_file)
    assert torch.equal(reloaded.fc.weight, trained.fc.weight)
    assert torch.equal(reloaded.conv1.weight, trained.conv1.weight)


def test_own_model_loads_a_local_state_dict(tmp_path: Path) -> None:
    trained = create_model("preact_resnet20", num_classes=10)
    weights_file = tmp_path / "preact20.pth"
    torch.save(trained.state_dict(), weights_file)
    reloaded = create_model("preact_resnet20", num_classes=10, pretrained=weights_file)
    for key, tensor in trained.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_weights_that_do_not_fit_fail_in_one_line(tmp_path: Path) -> None:
    weights_file = tmp_path / "small.pth"
    torch.save(create_model("small_cnn", num_classes=10).state_dict(), weights_file)
    with pytest.raises(PretrainedWeightsError) as caught:
        create_model("preact_resnet20", num_classes=10, pretrained=weights_file)
    assert "\n" not in str(caught.value) and "preact_resnet20" in str(caught.value)


def test_missing_weights_file_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError) as caught:
        create_model("resnet18", pretrained=tmp_path / "nope.pth")
    assert "\n" not in str(caught.value) and "nope.pth" in str(caught.value)


def test_failed_weight_download_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate being offline without touching the network: every torchvision weights enum fetches through this.
    def offline(*_: object, **__: object) -> None:
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError) as caught:
        create_model("resnet18", num_classes=10, pretrained=True)
    message = str(caught.value)
    assert "\n" not in message and "resnet18" in message and "pretrained=<path" in message


def test_own_families_have_no_downloadable_weights() -> None:
    with pytest.raises(PretrainedWeightsError, match="pretrained=<path"):
        create_model("preact_resnet20", pretrained=True)


def test_unknown_builder_options_are_named() -> None:
    assert create_model("small_cnn", num_classes=10, width=8).fc.in_features == 4 * 8 * 4
    with pytest.raises(QuantbenchError, match="no option 'depth'.*width"):
        create_model("small_cnn", depth=3)


def test_bad_input_errors_are_quantbench_errors_for_the_cli() -> None:
    # The CLI reports QuantbenchError subclasses as one line with exit status 2 instead of a traceback.
    assert issubclass(PretrainedWeightsError, QuantbenchError) and issubclass(QuantbenchError, ValueError)
    with pytest.raises(QuantbenchError):
        create_model("no_such_model")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_class_counts_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("small_cnn", num_classes=bad)  # type: ignore[arg-type]
