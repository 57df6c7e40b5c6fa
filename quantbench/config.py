"""One config path: every training default in one dataclass, presets and flags merged in one function, one ``--set``
grammar, validation once when a config is built.

``TrainConfig`` holds every recipe default, each with a one-line doc (``TrainConfig.doc(name)``) and the LSQ paper's
value where it has one (section 3.1 / spec 1.5): SGD momentum 0.9, cosine decay without restarts, LR 0.1 full
precision / 0.01 at 2-4 bits / 0.001 at 8 bits, weight decay 1e-4 at 4 and 8 bits, 0.5e-4 at 3 bits, 0.25e-4 at
2 bits. Building one validates it (``__post_init__``): bad values fail with one line naming the fix.

``merge(*layers)`` is the one merge of presets, TOML files and command-line flags (later layers win; ``None`` means
"not given"); ``parse_set`` the one ``--set NAME.KEY=V1[,V2]`` grammar (``KEY=V`` where the command has one quantizer).
"""

from __future__ import annotations

import ast
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import quantizers
from quantbench.errors import QuantbenchError

SCHEDULES = ("cosine", "step")
DEVICES = ("cpu", "cuda", "auto")
AMP_MODES = ("auto", "off", "bf16", "fp16")
BN_MODES = ("float", "fold")
DATA_PIPELINES = ("auto", "memory", "loader")


def paper_lr(bits: int | None) -> float:
    """LSQ's initial learning rate: 0.1 full precision, 0.01 below 8 bits, 0.001 at 8 bits and above."""
    if bits is None:
        return 0.1
    return 0.001 if bits >= 8 else 0.01


def paper_weight_decay(bits: int | None) -> float:
    """LSQ's weight decay: 1e-4 at 4 bits and above (and full precision), 0.5e-4 at 3 bits, 0.25e-4 at 2 bits."""
    if bits is None or bits >= 4:
        return 1e-4
    return {3: 0.5e-4, 2: 0.25e-4}[bits]


def check_bits(bits: int, flag: str = "--bits") -> int:
    """A bit width in quantizers' range, or the one-line error."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not quantizers.MIN_BITS <= bits <= quantizers.MAX_BITS:
        raise QuantbenchError(f"{flag} {bits} is out of range: choose {quantizers.MIN_BITS}..{quantizers.MAX_BITS}")
    return bits


def fp_or_bits(value: Any, flag: str = "--first-last-bits") -> int | None:
    """``"fp"`` (or None) -> None (full precision), anything else -> a checked bit width."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "fp"):
        return None
    try:
        return check_bits(int(value), flag)
    except (TypeError, ValueError):
        raise QuantbenchError(f"{flag} must be a bit width or 'fp', got {value!r}") from None


def _doc(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with a one-line doc (``metadata["doc"]``)."""
    if callable(default):
        return field(default_factory=default, metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


@dataclass
class TrainConfig:
    """One training run's recipe; every default lives here (validated when built)."""

    dataset: str = _doc("digits", "dataset name (quantbench list)")
    model: str = _doc("small_cnn", "model name (quantbench list)")
    out: str = _doc("runs/train", "run directory")
    quantizer: str | None = _doc(None, "quantizer name; None: full precision")
    bits: int | None = _doc(None, "bit width of weights and activations; None: full precision")
    first_last_bits: int | None = _doc(8, "bits of the first and last layers (paper: 8); None keeps them full precision")
    quantizer_options: dict[str, Any] = _doc(dict, "options of every quantizer (e.g. grad_scale=numel)")
    weight_options: dict[str, Any] = _doc(dict, "options of weight quantizers only")
    activation_options: dict[str, Any] = _doc(dict, "options of activation quantizers only")
    init_from: str | None = _doc(None, "full-precision run directory or state_dict file to fine-tune from")
    epochs: int = _doc(2, "training epochs (paper: 90 at 2-4 bits, 1 at 8 bits, from a full-precision model)")
    batch_size: int = _doc(128, "batch size")
    lr: float | None = _doc(None, "initial LR; None: the paper's by bits (0.1 fp, 0.01 at 2-4, 0.001 at 8)")
    weight_decay: float | None = _doc(None, "weight decay; None: the paper's by bits (1e-4; 0.5e-4 at 3; 0.25e-4 at 2)")
    momentum: float = _doc(0.9, "SGD momentum (paper: 0.9)")
    schedule: str = _doc("cosine", "cosine decay without restarts (paper), or step: x0.1 at 1/3 and 2/3")
    quantizer_weight_decay: bool = _doc(False, "apply weight decay to quantizer parameters too")
    distill: bool = _doc(False, "knowledge distillation from the --init-from teacher (paper section 3.7)")
    distill_temperature: float = _doc(1.0, "distillation temperature (paper: 1)")
    distill_weight: float = _doc(0.5, "weight of the teacher term; 0.5 = the paper's equal weights")
    seed: int = _doc(0, "random seed: model init, data order, augmentation")
    data_dir: str | None = _doc(None, "where the dataset lives")
    download: bool = _doc(False, "download the dataset when it is not found (needs network)")
    pretrained: bool | str = _doc(False, "start from pretrained weights (True: the model's own; a path: that file)")
    device: str = _doc("auto", "cpu, cuda, cuda:N or auto (CUDA when available)")
    amp: str = _doc("auto", "mixed precision: off, bf16, fp16 (with a gradient scaler), or auto: bf16 on CUDA, off on CPU")
    sync_bn: bool = _doc(False, "BatchNorm statistics over the global batch in a multi-process (torchrun) job")
    channels_last: bool = _doc(False, "NHWC memory format for the model and its inputs (faster convs on recent GPUs)")
    compile: bool = _doc(False, "torch.compile the whole (quantized) model")
    threads: int | None = _doc(None, "torch CPU threads; None: torch's default")
    workers: int = _doc(0, "DataLoader worker processes (0: load in the training process)")
    data_pipeline: str = _doc("auto", "memory: whole splits as tensors on the device, augmented per batch (digits, fashion-mnist, cifar); loader: torchvision transforms through a DataLoader; auto: memory where the dataset has it")
    max_train_batches: int | None = _doc(None, "a smoke-test cap on batches per epoch (recorded; never a default)")
    bn: str = _doc("float", "BatchNorm after a conv: float (paper: a float op) or fold (folded into the conv before weight quantization)")
    freeze_bn_epoch: int | None = _doc(None, "with --bn fold, freeze BN statistics from this epoch (0-based) on; None: never")
    dynamics_every: int = _doc(50, "record quantizer dynamics (ranges, clipping, oscillation) to dynamics.csv every N steps; 0: off")
    oscillation_dampen: float = _doc(0.0, "oscillation dampening lambda (Nagel et al. 2022), cosine-annealed from 0; 0: off")
    oscillation_freeze: float = _doc(0.0, "freeze weights whose oscillation frequency exceeds this (e.g. 0.02; Nagel et al. 2022); 0: off")
    tensorboard: bool = _doc(False, "also write loss, accuracy, LR and dynamics to TensorBoard event files in the run directory")

    def __post_init__(self) -> None:
        check_types(self)
        if (self.quantizer is None) != (self.bits is None):
            raise QuantbenchError("give --quantizer and --bits together (or neither, for full precision)")
        if self.quantizer is not None:
            quantizers.get(self.quantizer)  # unknown names fail with the list of available ones
            check_bits(self.bits)
        self.first_last_bits = fp_or_bits(self.first_last_bits)
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("threads", 1), ("workers", 0),
                              ("max_train_batches", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise QuantbenchError(f"--{name.replace('_', '-')} must be an integer of at least {minimum}, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise QuantbenchError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise QuantbenchError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise QuantbenchError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.distill and not self.init_from:
            raise QuantbenchError("--distill needs --init-from: the full-precision teacher")
        check_device(self.device)
        if self.amp not in AMP_MODES:
            raise QuantbenchError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.data_pipeline not in DATA_PIPELINES:
            raise QuantbenchError(f"--data-pipeline must be one of {', '.join(DATA_PIPELINES)}, got {self.data_pipeline!r}")
        if self.bn not in BN_MODES:
            raise QuantbenchError(f"--bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        if self.freeze_bn_epoch is not None and (isinstance(self.freeze_bn_epoch, bool)
                                                 or not isinstance(self.freeze_bn_epoch, int) or self.freeze_bn_epoch < 0):
            raise QuantbenchError(f"--freeze-bn-epoch must be an epoch number (0 or more), got {self.freeze_bn_epoch!r}")
        if self.freeze_bn_epoch is not None and self.bn != "fold":
            raise QuantbenchError("--freeze-bn-epoch only applies with --bn fold (BatchNorm folded into the conv); add "
                                  "--bn fold or drop --freeze-bn-epoch")
        if self.sync_bn and self.bn == "fold":
            raise QuantbenchError("--sync-bn does not synchronize folded BatchNorms yet; use --bn float with --sync-bn")
        check_dynamics(self)

    @staticmethod
    def doc(name: str) -> str:
        """The one-line doc of field ``name``."""
        return next(f.metadata.get("doc", "") for f in fields(TrainConfig) if f.name == name)

    @staticmethod
    def help(name: str) -> str:
        """Field ``name``'s doc and its default, for a command-line option's help."""
        default = next(f.default for f in fields(TrainConfig) if f.name == name)
        return f"{TrainConfig.doc(name)} (default: {'not set' if default is None else default})"

    @classmethod
    def from_layers(cls, *layers: dict[str, Any] | None) -> TrainConfig:
        """The config from layers (a file, then flags), merged by :func:`merge`; unknown keys fail in one line."""
        merged = merge(*layers)
        unknown = sorted(set(merged) - TRAIN_FIELDS)
        if unknown:
            raise QuantbenchError(f"unknown train option(s) {', '.join(unknown)}; the options are: "
                                  f"{', '.join(sorted(TRAIN_FIELDS))}")
        return cls(**merged)

    def with_paper_defaults(self) -> TrainConfig:
        """A copy with the paper's LR and weight decay filled in where they were left to it (``None``)."""
        return replace(
            self,
            lr=paper_lr(self.bits) if self.lr is None else self.lr,
            weight_decay=paper_weight_decay(self.bits) if self.weight_decay is None else self.weight_decay,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the types a TrainConfig field accepts, from its annotation (TOML and JSON values arrive untyped)
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict[str, Any]": (dict,),
          "bool | str": (bool, str)}


_OWN_PARSERS = {"first_last_bits"}  # a bit width or "fp": fp_or_bits checks it with its own message


def check_types(config: TrainConfig) -> None:
    """Every field's value against its annotation (``X | None`` allows None), or a one-line error naming the field,
    the value and the type wanted: once, where every config (CLI, TOML, JSON) is built."""
    for item in fields(config):
        annotation = str(item.type)
        optional = annotation.endswith(" | None")
        wanted = _TYPES.get(annotation.removesuffix(" | None"))
        value = getattr(config, item.name)
        if wanted is None or (value is None and optional) or item.name in _OWN_PARSERS:
            continue
        integer_like = bool not in wanted and isinstance(value, bool)  # True is an int to Python, not to a config
        if integer_like or not isinstance(value, wanted):
            kind = annotation.removesuffix(" | None").replace("dict[str, Any]", "table").replace("bool | str", "bool or path")
            raise QuantbenchError(f"option {item.name} (--{item.name.replace('_', '-')}) must be "
                                  f"{'a ' if kind != 'int' else 'an '}{kind}{' (or unset)' if optional else ''}, "
                                  f"got {value!r}")


def check_dynamics(config: TrainConfig) -> None:
    """``dynamics_every`` and the oscillation remedies, or the one-line error."""
    every = config.dynamics_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise QuantbenchError(f"--dynamics-every must be a number of steps (0 turns recording off), got {every!r}")
    for name in ("oscillation_dampen", "oscillation_freeze"):
        value = getattr(config, name)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise QuantbenchError(f"{flag} must be a number of at least 0 (0 turns it off), got {value!r}")
        if value and config.quantizer is None:
            raise QuantbenchError(f"{flag} needs a quantized run: give --quantizer and --bits")
    if config.oscillation_freeze > 1:
        raise QuantbenchError(f"--oscillation-freeze is a frequency threshold in (0, 1], e.g. 0.02; got {config.oscillation_freeze}")


def check_device(device: str) -> str:
    """``cpu``, ``auto``, ``cuda`` or ``cuda:N`` where CUDA exists; otherwise the one-line error."""
    import torch

    kind = device.split(":", 1)[0]
    if kind not in DEVICES or (":" in device and kind != "cuda"):
        raise QuantbenchError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise QuantbenchError("--device cuda: CUDA is not available here (no GPU or a CPU-only torch); use --device cpu or auto")
    return device


TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))


def merge(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Presets, config files and flags, lowest precedence first, merged into one dict: ``None`` values are "not
    given" and skipped; quantizer-option settings (the ``set`` table) merge key by key."""
    merged: dict[str, Any] = {}
    settings: dict[str, list[Any]] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            if key == "set":
                if not isinstance(value, dict):
                    raise QuantbenchError(f"set must be a table of NAME.KEY = value(s), e.g. set = {{\"lsq.grad_scale\" = "
                                          f"[\"full\", \"numel\"]}}; got {value!r}")
                settings.update({name: values if isinstance(values, list) else [values] for name, values in value.items()})
            else:
                merged[key] = value
    if settings:
        merged["set"] = settings
    return merged


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML preset (see experiments/), or JSON (a run's ``config.json`` gives its ``train`` table), as a dict."""
    file = Path(path)
    if not file.is_file():
        raise QuantbenchError(f"--config {path}: no such file (see experiments/ for examples)")
    if file.suffix == ".json":
        try:
            values = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise QuantbenchError(f"--config {path}: not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise QuantbenchError(f"--config {path}: expected a JSON object of options")
        values = values["train"] if isinstance(values.get("train"), dict) else values
        if "first_last_bits" in values and values["first_last_bits"] is None:
            values["first_last_bits"] = "fp"  # JSON null means full precision here, not "not given"
        return values
    try:
        return tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as error:
        raise QuantbenchError(f"--config {path}: not valid TOML: {error}") from None


def parse_value(raw: str) -> Any:
    """A ``--set`` value: a Python literal (1e-4, True, 'x') or, failing that, a bare word (numel)."""
    try:
        return ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        return raw.strip()


def parse_set(pairs: list[str] | None, default_name: str | None = None) -> dict[str, list[Any]]:
    """The one ``--set`` grammar: ``NAME.KEY=V1[,V2...]`` -> ``{"NAME.KEY": [V1, V2]}``.

    ``KEY=V`` (no ``NAME.``) is accepted where the command has one quantizer, ``default_name``.
    """
    settings: dict[str, list[Any]] = {}
    for pair in pairs or []:
        key, separator, raw = pair.partition("=")
        key = key.strip()
        name, dot, option = key.rpartition(".")
        if not separator or not key or (dot and (not name or not option)):
            raise QuantbenchError(f"--set expects NAME.KEY=VALUE[,VALUE...], e.g. lsq.grad_scale=numel; got {pair!r}")
        if not dot:
            if default_name is None:
                raise QuantbenchError(f"--set expects NAME.KEY=VALUE here, naming the quantizer (e.g. lsq.{key}=...); got {pair!r}")
            key = f"{default_name}.{key}"
        settings[key] = [parse_value(part) for part in raw.split(",")] if raw.strip() else [""]
    return settings


def single_options(settings: dict[str, list[Any]], quantizer: str | None, command: str) -> dict[str, Any]:
    """The options of ``quantizer`` from parsed ``--set`` settings, one value each (commands that do not sweep)."""
    options: dict[str, Any] = {}
    for key, values in settings.items():
        name, _, option = key.partition(".")
        if name != quantizer:
            raise QuantbenchError(f"--set {key}: {command} uses quantizer '{quantizer}', not '{name}'")
        if len(values) != 1:
            raise QuantbenchError(f"--set {key}: {command} takes one value; sweep values with quantbench compare")
        options[option] = values[0]
    return options
