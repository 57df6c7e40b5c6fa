"""Model quantization: ``quantize_(model, QuantConfig("lsq", bits=4), sample_input)`` swaps every Conv2d and Linear
for a version that quantizes its weights and its input activations with registered quantizers.

Policy (each choice recorded in the layer table and the run config):
* weights are quantized signed; a layer's input is quantized unsigned when it is never negative on the sample batch
  (it follows a ReLU) and signed otherwise (the normalized image input). Without a sample batch: the first layer is
  signed and every other unsigned.
* the first and last layers (in execution order on the sample batch; registration order without one) use
  ``first_last_bits`` (8 by default, as the LSQ paper; ``None`` keeps them full precision).
* the same quantizer family and options for weights and activations; ``weight_options`` / ``activation_options``
  add role-specific ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import quantizers
from quantbench.utils.modules import replace_submodule
from quantizers import Quantizer


@dataclass
class QuantConfig:
    """What to quantize with: one quantizer family at one bit width, first/last layers at ``first_last_bits``."""

    quantizer: str = "lsq"
    bits: int = 4
    first_last_bits: int | None = 8
    options: dict[str, Any] = field(default_factory=dict)
    weight_options: dict[str, Any] = field(default_factory=dict)
    activation_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QuantizedLayer(nn.Module):
    """Mixin for a layer whose weight and input pass through quantizers (``None`` = left in full precision)."""

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    def quantized_weight(self) -> Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantConv2d(nn.Conv2d, QuantizedLayer):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(nn.Linear, QuantizedLayer):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


def _swap(layer: nn.Module, weight_q: Quantizer | None, input_q: Quantizer | None) -> nn.Module:
    """A quantized copy of ``layer`` that shares its parameters (so checkpoints and optimizers keep their keys)."""
    if isinstance(layer, nn.Conv2d):
        quantized: nn.Module = QuantConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
            padding_mode=layer.padding_mode, device="meta",  # meta: no throw-away initialization
        )
    else:
        quantized = QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    quantized.weight = layer.weight
    quantized.bias = layer.bias
    quantized.train(layer.training)
    quantized.weight_quantizer = weight_q
    quantized.input_quantizer = input_q
    return quantized


def _layers_in_order(model: nn.Module, sample_input: Tensor | None) -> tuple[list[str], dict[str, bool]]:
    """Conv2d/Linear names in execution order and, per layer, whether its input was ever negative."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    if sample_input is None:
        order = list(names.values())
        return order, {name: index == 0 for index, name in enumerate(order)}
    order: list[str] = []
    negative: dict[str, bool] = {}

    def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        name = names[module]
        if name not in negative:
            order.append(name)
            negative[name] = False
        negative[name] |= bool((inputs[0] < 0).any())

    handles = [module.register_forward_pre_hook(record) for module in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    order += [name for name in names.values() if name not in negative]  # layers the sample never reached
    return order, {name: negative.get(name, False) for name in order}


@dataclass
class LayerPlan:
    """How one Conv2d/Linear is quantized: its bit width (None: left in full precision) and its input's sign."""

    bits: int | None
    input_signed: bool


def plan_layers(model: nn.Module, config: QuantConfig, sample_input: Tensor | None = None) -> dict[str, LayerPlan]:
    """The policy of the module docstring, applied to ``model`` (on ``sample_input`` when given)."""
    order, input_negative = _layers_in_order(model, sample_input)
    if not order:
        raise quantizers.QuantizerError("the model has no Conv2d or Linear layer to quantize")
    edge_layers = {order[0], order[-1]}
    return {name: LayerPlan(config.first_last_bits if name in edge_layers else config.bits, input_negative[name])
            for name in order}


def plan_from_layer_table(rows: list[dict[str, Any]]) -> dict[str, LayerPlan]:
    """The plan a run recorded in its ``layers.csv`` (``layer_table`` rows): bits 32 means full precision."""
    return {
        str(row["layer"]): LayerPlan(None if int(row["weight_bits"]) >= 32 else int(row["weight_bits"]),
                                     str(row.get("activation_signed")).lower() == "true")
        for row in rows
    }


def quantize_(model: nn.Module, config: QuantConfig, sample_input: Tensor | None = None,
              plan: dict[str, LayerPlan] | None = None) -> nn.Module:
    """Swap, in place, every Conv2d/Linear of ``model`` for a quantized one; returns ``model``.

    ``plan`` (e.g. a run's recorded layer table) says per layer how; without it the module's policy decides, on
    ``sample_input``. Quantizers initialize themselves on their first non-empty forward (weights from the initial
    weights, activations from the first training batch), so call this before building the optimizer and training.
    """
    quantizers.get(config.quantizer)  # unknown names fail before anything is changed
    plan = plan if plan is not None else plan_layers(model, config, sample_input)
    for name, layer_plan in plan.items():
        bits = layer_plan.bits
        layer = model.get_submodule(name)
        if bits is None:
            continue  # first/last layer kept in full precision
        weight_q = quantizers.create(
            config.quantizer, bits=bits, signed=True, **{**config.options, **config.weight_options}
        )
        signed_input = layer_plan.input_signed
        input_q = quantizers.create(
            config.quantizer,
            bits=bits,
            signed=signed_input,
            **({"role": "activation"} if signed_input else {}),
            **{**config.options, **config.activation_options},
        )
        replace_submodule(model, name, _swap(layer, weight_q, input_q))
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLayer)]


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learnable parameter that belongs to a quantizer (their own optimizer group)."""
    return [p for module in model.modules() if isinstance(module, Quantizer) for p in module.parameters()]


def regularization(model: nn.Module) -> Tensor:
    """Sum of every quantizer's extra loss term (PACT's L2 on alpha)."""
    terms = [module.regularization() for module in model.modules() if isinstance(module, Quantizer)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per Conv2d/Linear: bits, quantizer, activation sign, N used for the gradient scale, current steps."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        weight_q = getattr(module, "weight_quantizer", None)
        input_q = getattr(module, "input_quantizer", None)
        rows.append(
            {
                "layer": name,
                "type": type(module).__name__.replace("Quant", ""),
                "weight_shape": "x".join(map(str, module.weight.shape)),
                "quantizer": weight_q.registry_name if weight_q is not None else "fp",
                "weight_bits": weight_q.bits if weight_q is not None else 32,
                "activation_bits": input_q.bits if input_q is not None else 32,
                "activation_signed": input_q.signed if input_q is not None else None,
                "weight_n": getattr(weight_q, "last_n", None) or module.weight.numel(),
                "activation_n": getattr(input_q, "last_n", None),
                "weight_step": _step(weight_q),
                "activation_step": _step(input_q),
            }
        )
    return rows


def _step(quantizer: Quantizer | None) -> float | None:
    if quantizer is None or not bool(quantizer.initialized):
        return None
    return float(quantizer.current_step())


def model_size_bits(model: nn.Module) -> int:
    """Storage of the model's weights at their bit widths: quantized weights at b bits, everything else at 32."""
    quantized_weights = {
        id(module.weight): module.weight_quantizer.bits
        for _, module in quantized_layers(model)
        if module.weight_quantizer is not None
    }
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * quantized_weights.get(id(parameter), 32)
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and not name.endswith("initialized"):
            total += buffer.numel() * 32  # BatchNorm statistics are part of the deployed model
    return total
