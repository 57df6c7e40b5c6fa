"""The fused quantizer ops (one ``autograd.Function`` each, one elementwise pass forward and one backward, saving only
the input and the scalar parameters) and the switch that chooses how they run (:mod:`.dispatch`).

* ``lsq_quantize(v, step, qn, qp, g)``: LSQ (equations 1-3 and 5; also the fixed-step baselines);
  ``lsq_quantize_per_channel`` the same with one step per output channel (eager bodies: weights only);
* ``pact_quantize(v, alpha, qp, signed)``: PACT's clip quantizer (alpha not differentiated inside the step);
* ``dorefa_quantize(w, scale, n, detach_max)``: DoReFa weights (tanh, max, 2 q_k(.) - 1);
* ``qil_quantize(v, prune, clip, distance, gamma, q, signed, out_scale)``: QIL's transformer and discretizer;
* ``dsq_quantize``, ``apot_quantize``, ``ewgs_quantize``, ``n2uq_quantize``: DSQ's soft-staircase gradient, APoT's
  projection onto non-uniform levels, EWGS's sign-dependent gradient and N2UQ's learned cells, each one compiled
  elementwise kernel per direction (no native C kernel: the default backend compiles them); APoT and N2UQ look levels
  and cells up with comparison chains up to 4 bits and ``torch.bucketize`` above.

Each also has a **reference form**, the same maths composed from the straight-through primitives of
:mod:`quantizers.ste` (their surrogate, and the straightforward autograd implementation), which runs under a
surrogate tape or with ``kernels("reference")``. Fast and reference forms give identical outputs; gradients agree to
rounding (``tests/quantizers/kernels``).
"""

from .dispatch import BACKENDS, KernelSettings, kernel_settings, kernels, reference_active, set_kernels
from .apot import apot_quantize
from .dorefa import dorefa_quantize
from .dsq import dsq_quantize
from .ewgs import ewgs_quantize
from .lsq import lsq_quantize, lsq_quantize_per_channel
from .n2uq import n2uq_quantize
from .pact import pact_quantize
from .qil import qil_quantize

__all__ = [
    "BACKENDS",
    "KernelSettings",
    "kernel_settings",
    "kernels",
    "set_kernels",
    "reference_active",
    "lsq_quantize",
    "lsq_quantize_per_channel",
    "pact_quantize",
    "dorefa_quantize",
    "qil_quantize",
    "dsq_quantize",
    "apot_quantize",
    "ewgs_quantize",
    "n2uq_quantize",
]
