"""quantbench's quantizers: one interface, a registry, and the straight-through primitives they are built from.

    import quantizers
    q = quantizers.create("lsq", bits=2, signed=False)   # an nn.Module
    quantizers.available()                                # ['apot', 'dorefa', ..., 'tqt', ...plugins]

Write your own in one file: subclass ``Quantizer``, build ``quantize`` from ``round_ste`` / ``stop_gradient`` /
``scale_grad``, decorate with ``@quantizers.register("name")`` and load it with ``--plugin your_file.py``.
``quantizers.conformance.check_quantizer("name")`` checks it against finite differences.

Layout: ``base`` (the contract), ``registry``, ``ste`` (the straight-through primitives: the plugin API),
``integer`` (``IntegerSpec``), ``conformance`` (the kit), one file per family (``lsq``, ``qil``, ``pact``, ``fixed``, ``lsq_plus``, ``dsq``, ``apot``,
``ewgs``, ``n2uq``, ``tqt``, ``dorefa``, and the rest of LSQ's Table 1: ``faq``, ``lq_nets``, ``nice``, ``msqe_reg``)
and ``kernels/`` (the fused ops, their C and compiled kernels, and the switch that picks one).
"""

from .base import MAX_BITS, MIN_BITS, Quantizer, QuantizerError, Stage, check_choice, data_parallel_size, lsq_init_step
from .integer import IntegerSpec
from .kernels import kernels, lsq_quantize
from .registry import ENTRY_POINT_GROUP, PLUGIN_ENV_VAR, available, create, get, load_plugins, options_of, register
from .ste import record_surrogate, replay_surrogate, round_ste, scale_grad, stop_gradient

# Built-in quantizers register themselves on import (one file per family).
from . import apot, dorefa, dsq, ewgs, fixed, lsq, lsq_plus, n2uq, pact, qil, tqt  # noqa: E402,F401  isort: skip
from . import faq, lq_nets, msqe_reg, nice  # noqa: E402,F401  isort: skip  (the rest of the LSQ paper's Table 1)

__all__ = [
    "Quantizer",
    "QuantizerError",
    "Stage",
    "IntegerSpec",
    "check_choice",
    "kernels",
    "MIN_BITS",
    "MAX_BITS",
    "create",
    "register",
    "available",
    "get",
    "options_of",
    "load_plugins",
    "ENTRY_POINT_GROUP",
    "PLUGIN_ENV_VAR",
    "round_ste",
    "stop_gradient",
    "scale_grad",
    "lsq_quantize",
    "lsq_init_step",
    "data_parallel_size",
    "record_surrogate",
    "replay_surrogate",
]
