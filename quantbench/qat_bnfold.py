"""BatchNorm folding in QAT (``--bn fold``): every conv followed directly by a BatchNorm trains with the BN folded into
its weight and bias *before* weight quantization, so the quantizer sees (and learns a step for) the weights that are
deployed. ``--bn float`` (the default, the LSQ paper's) keeps BN a float op after the quantized conv.

The folded layer is Jacob et al. 2018, section 3.2 / torch.ao's ``ConvBn2d`` QAT module (its ``_forward_approximate``),
with ``s = gamma / sqrt(running_var + eps)``:

* training: ``y = conv(Q_x(x), Q_w(w * s)) / s (+ conv bias)``, then the BN with *batch* statistics (which also
  updates the running ones). Dividing by ``s`` is the running-statistics correction: the weights are quantized at
  the deployed (running) scale while the batch statistics still normalize the output during training;
* BN statistics frozen (epochs from ``--freeze-bn-epoch`` on; default never) and eval: the deployed form,
  ``conv(Q_x(x), Q_w(w * s)) + beta + (bias - running_mean) * s``. ``deployable()`` turns each folded pair into
  that plain (quantized) conv and drops the BN, which is what the integer and ONNX exports read.

Which pairs fold: a conv whose output goes *only* into a ``BatchNorm2d`` (found by tracing the model with torch.fx).
Folding BN into the *preceding* conv is exact; folding it into a following conv is not valid across the ReLU in
between, so BN-before-conv pairs are left float. Per family:

* ``small_cnn``: all three conv-BN pairs fold;
* torchvision ``resnet18/34/50`` and ``vgg16_bn`` (post-activation): every conv, downsample convs included;
* pre-activation ResNets (BN-ReLU-conv): only the conv-BN pairs *inside* a block (conv1->bn2, and conv2->bn3 in
  bottlenecks) and the ImageNet stem; the convs that end a block feed the residual sum, and the CIFAR stem conv
  also feeds the first block's identity shortcut, so their following BN stays float (as does ``final_bn``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from quantbench.errors import QuantbenchError
from quantbench.qat import QuantConv2d, QuantizedLayer
from quantbench.utils.modules import replace_submodule
from quantizers import Quantizer



class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm folded into the conv before it: an identity in the forward pass (the conv applies it), with its
    parameters and statistics kept in place, so checkpoints have the same keys as with ``--bn float``."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def normalize(self, y: Tensor) -> Tensor:
        """The BatchNorm itself (batch statistics in training, updating the running ones)."""
        return super().forward(y)


class ConvBn2d(nn.Conv2d):
    """A conv with the following BatchNorm folded into its weight and bias before weight quantization."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # instance attributes, not class ones: a class attribute would hide the quantizer modules assigned later
        self.weight_quantizer: Quantizer | None = None
        self.input_quantizer: Quantizer | None = None
        self.frozen = False  # BN statistics frozen: train on the running statistics (the deployed form)

    @property
    def bn(self) -> FoldedBatchNorm2d:
        return self.__dict__["_folded_bn"]  # not a child module: the BN stays registered where it was

    def fold_scale(self) -> Tensor:
        bn = self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def folded_parameters(self) -> tuple[Tensor, Tensor]:
        """The deployed weight (before weight quantization) and bias, from the running statistics."""
        bn, scale = self.bn, self.fold_scale()
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        bias = -bn.running_mean if self.bias is None else self.bias - bn.running_mean
        bias = bias * scale
        return weight, bias if not bn.affine else bn.bias + bias

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.input_quantizer is None else self.input_quantizer(x)
        weight, bias = self.folded_parameters()
        weight = weight if self.weight_quantizer is None else self.weight_quantizer(weight)
        if not self.training or self.frozen:
            return self._conv_forward(x, weight, bias)
        scale = self.fold_scale().reshape(1, -1, 1, 1)
        y = self._conv_forward(x, weight, None) / scale  # undo the running scale: BN normalizes with batch statistics
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return self.bn.normalize(y)


class QuantConvBn2d(ConvBn2d, QuantizedLayer):
    """A quantized conv (``quantize_``) with its BatchNorm folded."""


class _LeafTracer(torch.fx.Tracer):
    """Traces the wiring between layers, not into them (quantizers initialize on data)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, Quantizer)) or super().is_leaf_module(
            module, qualified_name)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where the conv's output goes only into that ``BatchNorm2d`` (each called once)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means "cannot find the pairs"
        raise QuantbenchError(f"--bn fold: torch.fx cannot trace {type(model).__name__} to find conv-BN pairs "
                              f"({type(error).__name__}); use --bn float") from None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv, bn = model.get_submodule(source.target), model.get_submodule(node.target)
        if (isinstance(conv, nn.Conv2d) and not isinstance(conv, ConvBn2d) and len(source.users) == 1
                and calls[source.target] == calls[node.target] == 1 and bn.track_running_stats
                and bn.num_features == conv.out_channels):
            pairs.append((source.target, node.target))
    return pairs


def _conv_like(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    """An empty ``cls`` with ``conv``'s geometry that shares its weight, bias and quantizers."""
    made = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
               dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
               device="meta")
    made.weight, made.bias = conv.weight, conv.bias
    if isinstance(conv, QuantizedLayer):
        made.weight_quantizer, made.input_quantizer = conv.weight_quantizer, conv.input_quantizer
    return made.train(conv.training)


def fold_bn_(model: nn.Module, model_name: str = "the model") -> list[tuple[str, str]]:
    """Fold, in place, every conv-BN pair of ``model`` (after ``quantize_``); returns the pairs folded."""
    pairs = foldable_pairs(model)
    if not pairs:
        raise QuantbenchError(f"--bn fold: {model_name} has no conv followed directly by a BatchNorm2d; use --bn float")
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        folded_bn = FoldedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                      device="meta")
        for key in ("weight", "bias"):
            setattr(folded_bn, key, getattr(bn, key))
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(folded_bn, key, getattr(bn, key))
        folded_bn.train(bn.training)
        replace_submodule(model, bn_name, folded_bn)
        folded = _conv_like(conv, QuantConvBn2d if isinstance(conv, QuantizedLayer) else ConvBn2d)
        folded.__dict__["_folded_bn"] = folded_bn
        replace_submodule(model, conv_name, folded)
    return pairs


def apply_bn_mode(model: nn.Module, config: Any) -> list[tuple[str, str]]:
    """``build_model``'s hook: fold per ``config.bn`` (``float``: nothing to do; the config validated the value)."""
    if config.bn != "fold":
        return []
    pairs = fold_bn_(model, config.model)
    _warn_without_zero_level(model)
    return pairs


def _warn_without_zero_level(model: nn.Module) -> None:
    """Folding divides each channel's output by its BN scale: a weight grid without a zero level (DoReFa's, LQ-Nets'
    {-1,+1} codes) pins small channels at the smallest level and that scale can collapse (reports/bn-fold/README.md)."""
    import warnings

    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None) if isinstance(module, ConvBn2d) else None
        if quantizer is None:
            continue
        try:
            has_zero = bool((quantizer.levels() == 0).any())
        except Exception:  # noqa: BLE001 - levels unknown before the quantizer sees data: nothing to say
            continue
        if not has_zero:
            warnings.warn(f"--bn fold with '{quantizer.registry_name}' weights ({name}): their grid has no zero level, "
                          "so channels far below the tensor's largest stay pinned at the smallest level and their "
                          "folded BN scale can collapse to NaN (reports/bn-fold/README.md); prefer a grid with zero "
                          "(e.g. --set pact.weight_scheme=symmetric) or --bn float", RuntimeWarning, stacklevel=2)
            return


def set_bn_frozen(model: nn.Module, config: Any, epoch: int) -> None:
    """Freeze the folded BNs' statistics from epoch ``config.freeze_bn_epoch`` (0-based) on; a no-op otherwise."""
    freeze = getattr(config, "freeze_bn_epoch", None)
    for module in model.modules():
        if isinstance(module, ConvBn2d):
            module.frozen = freeze is not None and epoch >= freeze


def deployable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as deployed: each folded pair a plain (quantized) conv holding the folded weight and bias,
    its BN gone; ``model`` itself when nothing is folded. The eval forward is the same computation."""
    if not any(isinstance(module, ConvBn2d) for module in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, FoldedBatchNorm2d):
            replace_submodule(model, name, nn.Identity())
        elif isinstance(module, ConvBn2d):
            with torch.no_grad():
                weight, bias = module.folded_parameters()
            plain = _conv_like(module, QuantConv2d if isinstance(module, QuantizedLayer) else nn.Conv2d)
            plain.weight, plain.bias = nn.Parameter(weight), nn.Parameter(bias)
            replace_submodule(model, name, plain)
    return model.eval()
