"""The one interface every quantizer implements.

A quantizer is an ``nn.Module`` that maps a float tensor to its quantized value at the input's scale. Subclasses
write four things: ``quantize(v)`` (the forward, built from :mod:`quantizers.ste` or :mod:`quantizers.kernels`),
``apply_step(step)`` (place the quantizer at a uniform step so different methods can start from the same operating
point; called by ``set_step``, which validates the step first and marks the quantizer initialized after), ``levels()``
(the values it can output now) and, optionally, ``initialize(v)`` (data-driven init; the default is LSQ's rule) and
``integer_spec()`` (how it runs on integers; the default reads a uniform grid off ``levels()``).

Training-time hooks (every one optional, each a no-op by default, so existing quantizers and plugins are unchanged):
``set_stage(stage)``, the training-stage signal the loop gives every quantizer before each step's forward (a
:class:`Stage`: step, total steps, epoch, progress, and where the quantizer's layer sits in the model), for methods
that change behaviour over training (NICE's staged blocks and noise, an annealed regularizer); ``after_step(step)``,
called after each optimizer step, outside autograd, for state updated by a rule rather than by gradients (LQ-Nets'
basis, EMA observers); ``regularization()``, an extra loss term the loop adds. In a data-parallel job the loop
broadcasts rank 0's state of every quantizer that overrides ``after_step`` right after the hook, so state stays
identical on every rank whatever the hook computed (see :mod:`quantbench.training.quantizer_hooks`).

Options are declared once, as ``__init__`` keyword arguments stored under the same attribute names: the registry
reads the signature (``quantizers.options_of``), ``options()`` reads the attributes, and :func:`check_choice` gives
the one-line error for a bad value. Everything else (bit-width validation, Q_N / Q_P, init-on-first-forward kept in
``state_dict``, dtype checks, metadata) lives here.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import QuantizerError
from .integer import IntegerSpec, spec_from_levels

MIN_BITS, MAX_BITS = 2, 16
ROLES = ("weight", "activation")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Stage:
    """Where training is: the signal ``Quantizer.set_stage`` receives before each step's forward.

    ``step`` of ``total_steps`` (global iterations), ``epoch`` of ``epochs``; ``layer`` is the index of the
    quantizer's layer among the model's quantized layers in module order and ``layers`` their count (0 and 1 for a
    quantizer outside a quantized layer). ``progress`` = step / total_steps, in [0, 1].
    """

    step: int
    total_steps: int
    epoch: int = 0
    epochs: int = 1
    layer: int = 0
    layers: int = 1

    @property
    def progress(self) -> float:
        return min(1.0, max(0.0, self.step / max(1, self.total_steps)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "progress": self.progress}


#: The stage a quantizer is in until the loop says otherwise (the kit, evaluation, export): the end of training.
FINAL_STAGE = Stage(step=1, total_steps=1)


class Quantizer(nn.Module):
    """Base class of every quantizer: ``Quantizer(bits, signed, role=None)``.

    ``qn`` and ``qp`` have the LSQ paper's meaning, the number of negative and positive levels:
    unsigned: Q_N = 0, Q_P = 2^b - 1; signed: Q_N = 2^(b-1), Q_P = 2^(b-1) - 1.
    ``role`` says what the tensor is ("weight" or "activation"); it defaults to "weight" when signed and
    "activation" when unsigned, and only changes conventions that the papers tie to it (LSQ's N for the gradient
    scale, QIL's learnable gamma, PACT's DoReFa weights).
    """

    #: set by ``@quantizers.register``
    registry_name: ClassVar[str] = ""
    #: one line shown by ``quantbench list``; defaults to the first line of the class docstring
    description: ClassVar[str] = ""
    #: True when the backward depends on the upstream gradient's sign or size (EWGS): the conformance kit then checks
    #: the gradient against the surrogate recorded during a backward pass instead of a fixed one.
    upstream_dependent_gradient: ClassVar[bool] = False
    #: False (on the class or an instance) when re-quantizing the quantizer's own output is not the identity
    #: (DoReFa's tanh warp); the conformance kit then reports idempotence as not applicable instead of failing it.
    idempotent: bool = True
    #: True when the forward draws random numbers in training (NICE's noise): the conformance kit then seeds torch's
    #: RNG identically before every forward of its gradient check, so the noise is frozen and finite differences mean
    #: something.
    stochastic: ClassVar[bool] = False

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise QuantizerError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise QuantizerError(f"bits={bits} is out of range: choose {MIN_BITS}..{MAX_BITS}")
        role = role or ("weight" if signed else "activation")
        if role not in ROLES:
            raise QuantizerError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.bits = bits
        self.signed = bool(signed)
        self.role = role
        self.qn = 2 ** (bits - 1) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        # A buffer, so a reloaded model does not re-initialize; mirrored in a Python bool so the hot path does not
        # synchronize with the device to read it.
        self.register_buffer("initialized", torch.tensor(False))
        self._is_initialized = False

    # ---- what subclasses write ---------------------------------------------------------------------------------

    def quantize(self, v: Tensor) -> Tensor:
        """The quantized value of ``v`` (already initialized, float): same shape and dtype, at ``v``'s scale."""
        raise NotImplementedError

    def apply_step(self, step: float) -> None:
        """Place the quantizer at the uniform step ``step`` (already validated: positive and finite)."""
        raise NotImplementedError

    def set_step(self, step: float) -> None:
        """Place the quantizer at the uniform step ``step`` and mark it initialized (validate, ``apply_step``, mark)."""
        self.apply_step(check_step(step))
        self.mark_initialized()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # one contract: set_step validates, calls apply_step and marks the quantizer initialized; an override would
        # skip the first and the last, so it is refused where the class is written, not discovered in a run
        if "set_step" in cls.__dict__:
            raise QuantizerError(f"quantizer class {cls.__name__} overrides set_step: override apply_step(self, step) "
                                 "instead (set_step validates the step, calls it and marks the quantizer initialized)")

    def levels(self) -> Tensor:
        """The sorted values the quantizer can output in its current state."""
        raise NotImplementedError

    def current_step(self) -> float:
        """The spacing of the output grid now, in the input's units (for layer tables and figures)."""
        levels = self.levels()
        return float((levels[1:] - levels[:-1]).min()) if levels.numel() > 1 else float("nan")

    def initialize(self, v: Tensor) -> None:
        """Data-driven init from ``v`` (the initial weights, or the first batch of activations).

        Default: LSQ's rule ``step = 2 * mean|v| / sqrt(Q_P)``, so a new quantizer starts where LSQ starts.
        """
        self.set_step(lsq_init_step(v, self.qp))

    def range_parameters(self) -> dict[str, nn.Parameter]:
        """The learnable parameters that control the step or range, the primary one first (Figure 2 and R use it).

        Empty for a quantizer that learns nothing. Default: every parameter of the module, in registration order.
        """
        return dict(self.named_parameters())

    def regularization(self) -> Tensor:
        """An extra loss term the method adds (PACT's L2 on alpha, msqe_reg's annealed MSQE); zero by default.
        The training loop sums it over the model's quantizers into the loss once per step, after the forward."""
        reference = next(iter(self.parameters()), self.initialized)
        return torch.zeros((), device=reference.device)

    # ---- training-time hooks (optional; no-ops by default) -------------------------------------------------------

    def set_stage(self, stage: Stage) -> None:
        """The training-stage signal, before each step's forward (see :class:`Stage`). Default: ignored.

        A quantizer that never receives one behaves as at the end of training (``FINAL_STAGE``): evaluation, the
        conformance kit and export see the final method."""

    def after_step(self, step: int) -> None:
        """Called by the training loop after the optimizer step of global iteration ``step``, under
        ``torch.no_grad()``: update state by a rule rather than by gradients (LQ-Nets' basis). Default: nothing.
        In a data-parallel job rank 0's state is broadcast to every rank right after (so a rank-local rule cannot
        make ranks drift); a hook may all-reduce its statistics first to use the global batch."""

    def conformance_stages(self) -> list[tuple[str, Stage]]:
        """Stages, besides the final one, in which the conformance kit also runs its gradient and shape checks
        (``(label, stage)`` pairs; e.g. NICE's noise block). Default: none."""
        return []

    def hooks(self) -> dict[str, bool]:
        """Which optional training-time hooks this quantizer's class overrides (recorded in run metadata)."""
        own = type(self)
        return {name: getattr(own, name) is not getattr(Quantizer, name)
                for name in ("set_stage", "after_step", "regularization")}

    def integer_spec(self) -> IntegerSpec:
        """How this quantizer, in its current state, runs on integers (export, integer inference).

        Default: the codes of a uniform ``levels()`` grid, for weights only (a weight's codes can be precomputed from
        the quantizer's own output); activations need the requantizer, so a quantizer whose activations should run
        on integers overrides this. Raises :class:`QuantizerError` saying why when it cannot run on integers.
        """
        if self.role != "weight":
            raise QuantizerError(
                f"quantizer '{self.registry_name or type(self).__name__}' cannot run on integers: quantbench does not "
                "know how its activations become integer codes; give the class an integer_spec() method (see "
                "quantizers.integer) or keep its layers in full precision"
            )
        return spec_from_levels(self.levels(), self.registry_name or type(self).__name__)

    def gradient_count(self, v: Tensor) -> int:
        """How many elements a gradient sum over ``v`` covers: ``v.numel()``, times the data-parallel world size for
        activations (a rank sees only its share of the global batch; weights are the same tensor on every rank).
        LSQ-style gradient scales use it, so a G-process run scales like the 1-process run with the same batch."""
        count = max(1, v.numel())
        return count * data_parallel_size() if self.role == "activation" else count

    def options(self) -> dict[str, Any]:
        """The options this quantizer was built with (recorded in run metadata): every ``__init__`` keyword argument
        after ``bits`` and ``signed``, read from the attribute of the same name, then ``conventions()``."""
        names = option_names(type(self))
        # options win over a convention of the same name: they are what rebuilds the quantizer
        return {**self.conventions(), "role": self.role, **{name: getattr(self, name) for name in names}}

    def conventions(self) -> dict[str, Any]:
        """Fixed conventions worth recording beside the options (e.g. LSQ's boundary rule); none by default."""
        return {}

    # ---- shared machinery --------------------------------------------------------------------------------------

    def forward(self, v: Tensor) -> Tensor:
        if not v.is_floating_point():
            raise QuantizerError(
                f"quantizer '{self.registry_name or type(self).__name__}' needs a floating-point tensor, "
                f"got {v.dtype}; convert it with .float()"
            )
        if v.dtype in HALF_DTYPES:
            # Mixed precision: quantize in float32 (codes on the float32 grid, parameter gradients summed in
            # float32), autocast off inside, and hand back the input's dtype.
            with torch.autocast(v.device.type, enabled=False):
                return self._initialize_and_quantize(v.float()).to(v.dtype)
        return self._initialize_and_quantize(v)

    def _initialize_and_quantize(self, v: Tensor) -> Tensor:
        if not self._is_initialized and v.numel() > 0:  # an empty batch says nothing about the data: wait
            with torch.no_grad():
                self.initialize(v.detach())
            self.mark_initialized()
        out = self.quantize(v)
        if out.shape != v.shape:  # a plugin's bug: name it here, not in the next layer's conv
            raise QuantizerError(f"quantizer '{self.registry_name or type(self).__name__}'.quantize returned shape "
                                 f"{tuple(out.shape)} for an input of shape {tuple(v.shape)}; it must keep the shape")
        return out

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._is_initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_initialized = bool(self.initialized)

    def metadata(self) -> dict[str, Any]:
        """Everything needed to rebuild this quantizer and to read its results: name, bits, sign, options."""
        return {
            "quantizer": self.registry_name,
            "bits": self.bits,
            "signed": self.signed,
            "qn": self.qn,
            "qp": self.qp,
            **self.options(),
            "hooks": self.hooks(),
        }

    def extra_repr(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"bits={self.bits}, signed={self.signed}, {options}"


def data_parallel_size() -> int:
    """How many processes share each batch: the world size inside a torch.distributed job, else 1.

    A quantizer whose gradient scale counts a batch's elements (LSQ's N for activations) multiplies by this, so a
    G-process run with global batch B scales like a 1-process run with batch B (each rank sees B/G samples).
    """
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def lsq_init_step(v: Tensor, qp: int, eps: float = 1e-8) -> float:
    """LSQ's initial step ``2 * mean|v| / sqrt(Q_P)``, floored at ``eps`` so all-zero data still gives a step."""
    value = 2.0 * float(v.detach().abs().float().mean()) / math.sqrt(qp)
    return value if math.isfinite(value) and value > eps else eps


def option_names(cls: type[Quantizer]) -> list[str]:
    """The options a quantizer class declares: its ``__init__`` keyword arguments after ``bits`` and ``signed``."""
    return [
        name for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "bits", "signed") and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    ]


def check_choice(quantizer: str, option: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else the one-line error naming them."""
    choices = tuple(choices)
    if value not in choices:
        raise QuantizerError(f"{quantizer} {option} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_step(step: float) -> float:
    """Validate a step given to ``set_step``: positive and finite."""
    step = float(step)
    if not math.isfinite(step) or step <= 0:
        raise QuantizerError(f"step must be a positive finite number, got {step}")
    return step
