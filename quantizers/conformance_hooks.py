"""The conformance kit's checks of the training-time hooks (see :mod:`quantizers.conformance`): ``stages`` re-runs
the gradient check in each stage a quantizer names, ``step-hook`` checks ``after_step`` against ``levels()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from quantizers import Quantizer

from .conformance_checks import Factory, NotApplicable, _check_gradients


def _check_stages(build: Factory, bits: int, signed: bool, role: str) -> Callable[[Any], None]:
    """The gradient check again in every stage the quantizer names (``conformance_stages()``), e.g. NICE's noise
    block, with its noise frozen (seeded), and outputs finite with the input's shape there."""
    stages = build(bits, signed, role).conformance_stages()
    if not stages:
        raise NotApplicable("no training stages to check (conformance_stages() is empty)")

    def in_stage(stage: Any) -> Factory:
        def staged(*args: Any) -> Quantizer:
            quantizer = build(*args)
            quantizer.set_stage(stage)
            return quantizer
        return staged

    bodies = [(label, in_stage(stage), _check_gradients(in_stage(stage), bits, signed, role)) for label, stage in stages]

    def body(data: Any) -> None:
        for label, staged, gradients in bodies:
            try:
                quantizer = staged(bits, signed, role)
                values = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
                output = quantizer(values)
                assert output.shape == values.shape and torch.isfinite(output).all(), "bad output shape or values"
                gradients(data)
            except AssertionError as error:
                raise AssertionError(f"in stage '{label}': {error}") from None

    return body


def _check_step_hook(build: Factory, bits: int, signed: bool, role: str) -> Callable[[], None]:
    """For a quantizer with an ``after_step`` hook: five training steps (forward with gradients, backward, hook);
    after each, the outputs lie on ``levels()`` (the hook keeps them consistent), the state is finite, and a hook
    call with no training forward since the last one changes nothing."""
    if not build(bits, signed, role).hooks()["after_step"]:
        raise NotApplicable("no after_step hook")

    def body() -> None:
        generator = torch.Generator().manual_seed(4)
        quantizer = build(bits, signed, role)
        data = 2.0 * torch.randn(4, 64, generator=generator) + 0.5
        weights = torch.randn(4, 64, generator=generator)
        for step in range(5):
            batch = (data + 0.3 * torch.randn(4, 64, generator=generator)).requires_grad_(True)
            (quantizer(batch) * weights).sum().backward()
            with torch.no_grad():
                quantizer.after_step(step)
            state = {key: value.clone() for key, value in quantizer.state_dict().items()}
            for key, value in state.items():
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), f"step {step}: non-finite state '{key}' after after_step"
            with torch.no_grad():
                output = quantizer(batch.detach())
            levels = quantizer.levels().detach().flatten()
            distance = (output.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
            tolerance = 1e-5 * max(quantizer.current_step(), float(levels.abs().max()))
            assert float(distance.max()) <= tolerance, (
                f"after after_step({step}) an output is {float(distance.max()):.3g} away from levels(): the hook "
                "changed the quantizer without keeping levels() consistent with its outputs")
            with torch.no_grad():
                quantizer.after_step(step)  # no training forward since the last hook: nothing to update
            for key, value in quantizer.state_dict().items():
                assert torch.equal(value, state[key]), f"'{key}' changed in after_step without a training forward"

    return body


HOOK_PROPERTY_CHECKS = {"stages": _check_stages}
HOOK_ONCE_CHECKS = {"step-hook": _check_step_hook}
