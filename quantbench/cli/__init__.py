"""The ``quantbench`` command line: ``app`` (typer) and ``main`` (the console script). Commands live in one module
per kind: :mod:`.basics` (list, check, fig2), :mod:`.training` (train, compare, report, gradscale) and :mod:`.runs`
(qerror, export, evaluate), :mod:`.status` (status of a comparison grid), :mod:`.plan` (seeds a question needs),
:mod:`.dynamics` (figures of recorded training dynamics)."""

from quantbench.cli.app import app, main
from quantbench.cli import basics, dynamics, plan, runs, status, training  # noqa: E402,F401  (importing registers the commands)

__all__ = ["app", "main"]

