"""A name -> builder registry for datasets and models (timm's ``@register_model`` pattern, shared by both)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from quantbench.errors import QuantbenchError

Builder = TypeVar("Builder", bound=Callable)


class Registry(Generic[Builder]):
    """Builders registered under names; each builder's docstring's first line is its one-line description."""

    def __init__(self, kind: str, canonical: Callable[[str], str] = str.strip) -> None:
        self.kind = kind  # "dataset" or "model", for messages
        self._canonical = canonical
        self._builders: dict[str, Builder] = {}

    def register(self, name: str) -> Callable[[Builder], Builder]:
        """Decorator: make ``builder`` available as ``name``; a name taken by another builder fails.

        The builder's docstring's first line is its one-line description (``info``, ``quantbench list``).
        """
        if not isinstance(name, str) or not name or name != name.strip() or "," in name:
            raise QuantbenchError(f"a {self.kind} name must be a non-empty string without spaces or commas, got {name!r}")

        def decorate(builder: Builder) -> Builder:
            existing = self._builders.get(name)
            if existing is not None and existing is not builder:
                raise QuantbenchError(
                    f"{self.kind} name '{name}' is already taken by {existing.__module__}.{existing.__qualname__}; "
                    "register yours under another name"
                )
            self._builders[name] = builder
            return builder

        return decorate

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._builders)

    def get(self, name: str) -> Builder:
        """The builder for ``name``; an unknown name fails with the list of available ones."""
        builder = self._builders.get(self._canonical(name) if isinstance(name, str) else name)
        if builder is None:
            raise QuantbenchError(f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}")
        return builder

    def info(self, name: str) -> str:
        """The one-line description of ``name`` (its builder's docstring's first line), for ``quantbench list``."""
        return (inspect.getdoc(self.get(name)) or "").split("\n", 1)[0]

    def check_keywords(self, name: str, given: Iterable[str], common: set[str]) -> None:
        """Fail in one line when ``given`` holds a keyword ``name``'s builder does not take beyond ``common``.

        A builder that forwards ``**kwargs`` checks its own options, so nothing is refused for it here.
        """
        parameters = inspect.signature(self.get(name)).parameters.values()
        if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
            return
        accepted = {parameter.name for parameter in parameters} - common
        if unknown := sorted(set(given) - accepted):
            raise QuantbenchError(f"{self.kind} '{name}' has no option {', '.join(map(repr, unknown))}; "
                                  f"its options are: {', '.join(sorted(accepted)) or 'none'}")
