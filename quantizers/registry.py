"""Name -> quantizer class registry, plugin discovery and the ``create`` factory (timm's ``create_model`` style).

Plugins are found three ways, all of which end in an import that runs ``@quantizers.register``:
the entry-point group ``quantbench.quantizers`` (installed packages), the ``QUANTBENCH_PLUGINS`` environment
variable (comma-separated modules or .py files) and ``--plugin`` on every CLI command (``load_plugins``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from .base import Quantizer, QuantizerError, option_names

ENTRY_POINT_GROUP = "quantbench.quantizers"
PLUGIN_ENV_VAR = "QUANTBENCH_PLUGINS"

_REGISTRY: dict[str, type[Quantizer]] = {}
_discovered = False
QuantizerClass = TypeVar("QuantizerClass", bound=type[Quantizer])


def register(name: str) -> Callable[[QuantizerClass], QuantizerClass]:
    """Class decorator: make ``cls`` available as ``quantizers.create(name, ...)``."""
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise QuantizerError(f"a quantizer name must be a non-empty string without spaces or commas, got {name!r}")

    def decorate(cls: QuantizerClass) -> QuantizerClass:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise QuantizerError(f"@register({name!r}) needs a subclass of quantizers.Quantizer, got {cls!r}")
        existing = _REGISTRY.get(name)
        # The same class seen again (a plugin imported both by entry point and by --plugin) is not a clash.
        if existing is not None and _identity(existing) != _identity(cls):
            raise QuantizerError(
                f"quantizer name '{name}' is already taken by {existing.__module__}.{existing.__qualname__}; "
                "register yours under another name"
            )
        cls.registry_name = name
        if not cls.description:
            cls.description = (inspect.getdoc(cls) or "").split("\n", 1)[0]
        _REGISTRY[name] = cls
        return cls

    return decorate


def _identity(cls: type) -> tuple[str, str]:
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__file__", None) or cls.__module__
    return (str(Path(source).resolve()) if source.endswith(".py") else source, cls.__qualname__)


def available() -> list[str]:
    """Names of every registered quantizer, plugins included, sorted."""
    discover_plugins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Quantizer]:
    """The class registered as ``name``; an unknown name fails with the list of available ones."""
    discover_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QuantizerError(
            f"unknown quantizer '{name}'; available: {', '.join(sorted(_REGISTRY))} "
            "(load your own with --plugin MODULE)"
        ) from None


def create(name: str, *, bits: int, signed: bool, **options: Any) -> Quantizer:
    """Build the quantizer registered as ``name``: ``create("lsq", bits=2, signed=False, grad_scale="full")``."""
    cls = get(name)
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        raise QuantizerError(
            f"quantizer '{name}' has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(bits=bits, signed=signed, **options)


def options_of(name: str) -> dict[str, Any]:
    """The options ``name`` accepts with their defaults (for ``quantbench list`` and docs)."""
    parameters = inspect.signature(get(name).__init__).parameters
    return {
        key: (None if parameters[key].default is inspect.Parameter.empty else parameters[key].default)
        for key in option_names(get(name))
    }


def _accepted_options(cls: type[Quantizer]) -> set[str] | None:
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return None  # the class forwards **kwargs; let it report unknown ones itself
    return set(option_names(cls))


# ---- plugins --------------------------------------------------------------------------------------------------


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import each plugin (a dotted module path or a ``.py`` file) so its ``@register`` calls run."""
    discover_plugins()
    for module in modules:
        _import_plugin(module, origin="--plugin")


def discover_plugins() -> None:
    """Load the entry-point group and ``QUANTBENCH_PLUGINS`` once per process."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken third-party package must say which one it is
            raise QuantizerError(
                f"could not load quantizer plugin '{entry_point.name}' ({entry_point.value}) from entry-point group "
                f"{ENTRY_POINT_GROUP}: {type(error).__name__}: {error}"
            ) from error
    for module in filter(None, (part.strip() for part in os.environ.get(PLUGIN_ENV_VAR, "").split(","))):
        _import_plugin(module, origin=PLUGIN_ENV_VAR)


def _import_plugin(spec: str, origin: str) -> None:
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {spec}")
            module_name = f"quantbench_plugin_{path.stem}"
            if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(path.resolve()):
                return
            module_spec = importlib.util.spec_from_file_location(module_name, path.resolve())
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            # Console scripts do not put the working directory on sys.path; a user's own module usually lives there.
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            importlib.import_module(spec)
    except QuantizerError:
        raise
    except Exception as error:
        raise QuantizerError(
            f"could not import plugin '{spec}' (from {origin}): {type(error).__name__}: {error}; "
            "pass an importable module path (check PYTHONPATH) or a .py file"
        ) from error
