"""Nothing in a quantizer is CPU-only by accident: every tensor it builds lives on its parameters' device.

No GPU is needed: the ``meta`` device stands in for CUDA (an op mixing a CPU tensor with a meta tensor fails the same
way a CPU/CUDA mix does), which is how PACT's and QIL's CPU ``arange`` in ``levels()`` was found."""

from __future__ import annotations

import pytest
import torch

import quantizers


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("name", quantizers.available())
def test_levels_and_outputs_stay_on_the_quantizers_device(name: str, signed: bool) -> None:
    quantizer = quantizers.create(name, bits=3, signed=signed)
    quantizer(torch.randn(64, 4))  # initialized on the CPU, as a checkpoint would be
    quantizer = quantizer.to("meta")
    try:
        levels = quantizer.levels()
    except NotImplementedError as error:  # e.g. torch.unique has no meta kernel: nothing to learn on this device
        pytest.skip(f"levels() uses an op without a meta kernel: {str(error).splitlines()[0][:60]}")
    assert levels.device.type == "meta"
    assert quantizer.regularization().device.type == "meta"
    out = quantizer.quantize(torch.randn(64, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (64, 4)
