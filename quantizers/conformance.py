"""The conformance kit: checks any registered quantizer, built-in or yours, the same way.

    from quantizers.conformance import check_quantizer
    check_quantizer("lsq")                      # raises AssertionError with a table of what failed

or ``quantbench check NAME --plugin my_quantizer.py``. Each check runs for bits 2/3/4/8 and three roles (signed
weights, unsigned activations, signed activations), on Hypothesis-generated tensors where data matters:

* ``grid``: outputs lie on ``levels()``, at most 2^b distinct levels;
* ``idempotent``: quantizing the output again changes nothing (n/a when the quantizer declares ``idempotent=False``);
* ``shape-dtype``: output keeps the input's shape and dtype (float32, float64, bfloat16; 0-d to 4-d);
* ``state-dict``: a reloaded quantizer is initialized, does not re-initialize, and gives identical outputs;
* ``init``: the first forward initializes (buffer ``initialized`` set) and later forwards do not re-initialize;
* ``extremes``: no NaN/inf in outputs or gradients for zeros, +-1e30 and tiny steps;
* ``gradients``: autograd gradients w.r.t. the input and every learnable parameter equal central finite differences
  of the quantizer's straight-through surrogate (see ``quantizers.ste``), in float64, on tensors placed by
  ``set_step(s)`` and kept at least 0.05 steps away from rounding ties and from the clip edges.

  A quantizer whose backward depends on the upstream gradient itself (EWGS scales each element's gradient by the
  sign of its upstream gradient) has no single surrogate: it declares ``upstream_dependent_gradient = True`` and
  builds, under the tape, pieces that a backward pass fills in (e.g. that sign, via a tensor hook). The kit then
  records its surrogate with autograd on and back-propagates the *same* loss once before replaying it, so the
  finite differences are those of the surrogate for the upstream gradient autograd sees. A quantizer declaring
  ``stochastic = True`` (NICE's noise) has torch's RNG seeded identically before every forward of the check, so
  its noise is frozen and the finite differences are those of one draw.
* ``stages``: the gradient check again in each training stage the quantizer names (``conformance_stages()``: NICE's
  noise block and its not-yet-quantized block, msqe_reg's soft phase), noise frozen the same way; n/a without any.
* ``options``: ``options()`` reads back every ``__init__`` option (stored under its own name), and
  ``create(name, bits=, signed=, **options)`` rebuilds a quantizer with the same options (what run metadata,
  ``repr`` and reloading a run rely on).
* a configuration that cannot be built (``__init__`` raises) fails every check of that configuration.
* ``step-hook``: for a quantizer with an ``after_step`` hook (LQ-Nets' basis update), five training steps of forward,
  backward and hook: outputs stay on ``levels()``, the state stays finite, and a hook with no training forward since
  the last one changes nothing; n/a without a hook.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import quantizers

from .conformance_checks import (DEFAULT_BITS, ONCE_CHECKS, PROPERTY_CHECKS, ROLE_CONFIGS, NotApplicable, _factory,
                                 _run_once, _run_property)
from .conformance_hooks import HOOK_ONCE_CHECKS, HOOK_PROPERTY_CHECKS

PROPERTY = {**PROPERTY_CHECKS, **HOOK_PROPERTY_CHECKS}  # checks run on Hypothesis examples
ONCE = {**ONCE_CHECKS, **HOOK_ONCE_CHECKS}  # checks run once per configuration
from .conformance_report import CHECKS, CheckResult, Report


def run_checks(
    name: str,
    *,
    bits: Iterable[int] = DEFAULT_BITS,
    examples: int = 25,
    options: dict[str, Any] | None = None,
    checks: Iterable[str] = CHECKS,
) -> Report:
    """Run the conformance checks on the registered quantizer ``name``; returns a :class:`Report`."""
    quantizers.get(name)  # unknown names fail here, with the list of available ones
    build = _factory(name, options or {})
    report = Report(name)
    bits = list(bits)
    for bit_width in bits:  # bad input, not a failing quantizer: one line before any check runs
        if isinstance(bit_width, bool) or not isinstance(bit_width, int) or not quantizers.MIN_BITS <= bit_width <= quantizers.MAX_BITS:
            raise quantizers.QuantizerError(f"bits={bit_width} is out of range: choose {quantizers.MIN_BITS}..{quantizers.MAX_BITS}")
    for check in checks:
        if check not in CHECKS:
            raise quantizers.QuantizerError(f"unknown check '{check}'; available: {', '.join(CHECKS)}")
    for bit_width in bits:
        for signed, role in ROLE_CONFIGS:
            try:
                build(bit_width, signed, role)
            except Exception as error:  # noqa: BLE001 - a configuration quantize_ will ask for and cannot get
                for check in checks:
                    report.results.append(CheckResult(check, bit_width, signed, role, "fail",
                                                      f"cannot build: {type(error).__name__}: {error}"))
                continue
            for check in checks:
                try:
                    if check in PROPERTY:
                        body = PROPERTY[check](build, bit_width, signed, role)
                        result = _run_property(check, bit_width, signed, role, examples, body)
                    else:
                        result = _run_once(check, bit_width, signed, role, ONCE[check](build, bit_width, signed, role))
                except NotApplicable as reason:
                    result = CheckResult(check, bit_width, signed, role, "n/a", str(reason))
                report.results.append(result)
    return report


def check_quantizer(name: str, **kwargs: Any) -> Report:
    """Run :func:`run_checks` and raise ``AssertionError`` with the table if any check fails (for pytest)."""
    report = run_checks(name, **kwargs)
    if not report.passed:
        details = "\n".join(f"  {result.check} [{result.config}]: {result.detail}" for result in report.failures())
        raise AssertionError(f"{report.table()}\nfailures:\n{details}")
    return report
