"""Errors that mean bad input rather than a bug: the CLI prints their one-line message and exits with status 2."""

from __future__ import annotations


class QuantbenchError(ValueError):
    """Bad input to quantbench (a name, a path, an option); the message is one line that names the fix."""
