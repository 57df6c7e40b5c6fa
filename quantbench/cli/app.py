"""The ``quantbench`` command line (typer): a thin layer. Each command turns its flags into a config and calls the
library function of the same job (``quantbench.training.run.train``, ``quantbench.comparison.compare.run_compare``, ...).

Every command takes ``--plugin MODULE_OR_FILE`` (repeatable) so a user's own quantizer is available to it;
``QUANTBENCH_PLUGINS`` and the ``quantbench.quantizers`` entry-point group are read as well. Expected failures
(unknown names, bad bits, missing data, a plugin that does not import) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

import quantizers

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="quantbench: which quantizer should I trust at 2, 3, 4 and 8 bits, measured the same way?",
    pretty_exceptions_enable=False,
)
console = Console()

PluginOption = Annotated[
    Optional[list[str]],
    typer.Option("--plugin", help="Import a module or .py file that registers quantizers (repeatable)."),
]



def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, not a bug: reported as one line."""
    from quantbench.errors import QuantbenchError

    errors: list[type[BaseException]] = [quantizers.QuantizerError, QuantbenchError]
    try:
        from quantbench.data import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def parse_csv_ints(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise quantizers.QuantizerError(f"{what} must be comma-separated integers, e.g. 2,3,4,8; got {text!r}") from None



def csv_list(text: str | None, cast: Any = str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise quantizers.QuantizerError(f"expected a comma-separated list, got {text!r}") from None



def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)



def main() -> None:
    """Console-script entry point: run the app, turning expected errors into one line and exit status 2."""
    try:
        app()
    except _expected_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

