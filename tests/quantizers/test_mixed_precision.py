"""Half-precision inputs (float16, bfloat16, and what torch.autocast hands a quantizer) are quantized in float32: the
outputs are the float32 outputs cast to the input's dtype, and parameter gradients are float32's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantizers
from quantizers import Quantizer, round_ste, scale_grad

HALF = [torch.float16, torch.bfloat16]


def _grads(quantizer: Quantizer, v: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    for parameter in quantizer.parameters():
        parameter.grad = None
    leaf = v.detach().clone().requires_grad_(True)
    out = quantizer(leaf)
    out.backward(upstream)
    return out.detach(), leaf.grad, {name: p.grad.clone() for name, p in quantizer.named_parameters()
                                      if p.grad is not None}


def _check(quantizer: Quantizer, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    v = (torch.randn(4096, generator=generator) * 1.5).to(dtype)
    upstream = torch.randn(4096, generator=generator).to(dtype)
    quantizer(v.float())  # initialize once, from float32 data, so both paths start from the same state
    out32, grad32, params32 = _grads(quantizer, v.float(), upstream.float())
    out16, grad16, params16 = _grads(quantizer, v, upstream)
    assert out16.dtype == dtype and grad16.dtype == dtype
    assert torch.equal(out16, out32.to(dtype))
    assert torch.equal(grad16, grad32.to(dtype))
    assert params16.keys() == params32.keys()
    for name, value in params32.items():
        assert params16[name].dtype == torch.float32
        torch.testing.assert_close(params16[name], value, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("name", quantizers.available())
def test_half_inputs_give_the_float32_levels_and_gradients(name: str, signed: bool, dtype: torch.dtype) -> None:
    for bits in (2, 8):
        _check(quantizers.create(name, bits=bits, signed=signed), dtype)


class HalfBlindStep(Quantizer):
    """A plugin that does nothing about precision itself: the base class must still quantize it in float32."""

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.step_size = nn.Parameter(torch.tensor(1.0))

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        assert v.dtype == torch.float32  # what the base class promises the plugin
        step = scale_grad(self.step_size, 0.1)
        return round_ste(torch.clamp(v / step, -self.qn, self.qp)) * step

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.step_size.fill_(step)

    def levels(self) -> torch.Tensor:
        return torch.arange(-self.qn, self.qp + 1, device=self.step_size.device) * self.step_size.detach()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_plugin_gets_float32_quantization_through_the_base_class(dtype: torch.dtype) -> None:
    _check(HalfBlindStep(bits=3, signed=True), dtype)


def test_under_autocast_the_quantized_activation_is_on_the_float32_grid() -> None:
    """torch.autocast hands the activation quantizer a bfloat16 tensor; its codes must be float32's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    quantizer = quantizers.create("lsq", bits=4, signed=True)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activation = conv(x)
        assert activation.dtype == torch.bfloat16
        out = quantizer(activation)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, quantizer(activation.float()).to(torch.bfloat16))
    codes = out.float() / quantizer.step_size.detach()
    # on the grid up to bfloat16's own rounding of k * step (8 bits of mantissa)
    assert torch.allclose(codes, codes.round(), atol=codes.abs().max().item() * 2**-7)
