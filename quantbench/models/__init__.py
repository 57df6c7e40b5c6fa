"""Model registry and ``create_model`` factory (named like torchvision's builders, organized like timm).

One module per family registers its builders with ``@register_model``:

* :mod:`.preact_resnet`: pre-activation ResNets as in the LSQ paper (CIFAR 20/32/56, ImageNet 18/34/50),
* :mod:`.small_cnn`: a tiny CNN for fast CPU runs,
* :mod:`.torchvision_models`: torchvision's ResNet-18/34/50 and VGG-16-BN, with optional ImageNet weights.

``create_model("preact_resnet20", num_classes=10, in_channels=3)`` builds one; ``available_models()`` lists them.
"""

from ._registry import (
    PretrainedWeightsError,
    available_models,
    create_model,
    load_weights_file,
    model_info,
    register_model,
)
from . import preact_resnet, small_cnn, torchvision_models  # noqa: E402,F401  (importing registers the families)

__all__ = [
    "PretrainedWeightsError",
    "available_models",
    "create_model",
    "load_weights_file",
    "model_info",
    "register_model",
]
