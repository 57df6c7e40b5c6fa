"""``quantbench list``, ``check`` and ``fig2``: the registry, the conformance kit, LSQ's Figure 2."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

import quantizers
from quantbench.cli.app import PluginOption, app, console, parse_csv_ints
from quantbench.config import parse_set, single_options


@app.command("list")
def list_command(plugin: PluginOption = None) -> None:
    """Show the registered quantizers (plugins included), datasets and models."""
    quantizers.load_plugins(plugin or [])
    table = Table(title="quantizers", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("options (default)")
    for name in quantizers.available():
        options = ", ".join(f"{key}={value!r}" for key, value in quantizers.options_of(name).items())
        table.add_row(name, quantizers.get(name).description, options)
    console.print(table)
    for title, module_name, names, info in (
        ("datasets", "quantbench.data", "available_datasets", "dataset_info"),
        ("models", "quantbench.models", "available_models", "model_info"),
    ):
        try:
            module = __import__(module_name, fromlist=[names])
        except ImportError:
            continue
        table = Table(title=title, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        for name in getattr(module, names, list)():
            table.add_row(name, getattr(module, info)(name))
        console.print(table)


@app.command("check")
def check_command(
    name: Annotated[str, typer.Argument(help="Registered quantizer name.")],
    plugin: PluginOption = None,
    bits: Annotated[str, typer.Option(help="Bit widths to check, comma separated.")] = "2,3,4,8",
    examples: Annotated[int, typer.Option(help="Hypothesis examples per property and configuration.")] = 25,
    set_option: Annotated[
        Optional[list[str]], typer.Option("--set", help="Quantizer option KEY=VALUE (repeatable).")
    ] = None,
) -> None:
    """Run the conformance kit on a quantizer; exits non-zero if any check fails."""
    from quantizers.conformance import run_checks

    quantizers.load_plugins(plugin or [])
    bit_widths = parse_csv_ints(bits, "--bits")
    with console.status(f"checking '{name}'"):
        report = run_checks(name, bits=bit_widths, examples=examples, options=single_options(parse_set(set_option, name), name, "check"))
    table = Table(title=f"conformance of quantizer '{name}'", title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    styles = {"pass": "green", "FAIL": "bold red", "n/a": "yellow"}
    for check, status, detail in report.summary_rows():
        table.add_row(check, f"[{styles[status]}]{status}[/]", escape(detail))
    console.print(table)
    if not report.passed:
        for failure in report.failures():
            console.print(f"[red]FAIL[/] {escape(f'{failure.check} [{failure.config}]: {failure.detail}')}")
        raise typer.Exit(1)


@app.command("fig2")
def fig2_command(
    plugin: PluginOption = None,
    quantizer_names: Annotated[
        str, typer.Option("--quantizers", help="Registered quantizers to draw, comma separated (plugins included).")
    ] = "lsq,qil,pact",
    bits: Annotated[int, typer.Option(help="Bit width.")] = 2,
    signed: Annotated[
        bool, typer.Option("--signed/--unsigned", help="Signed (weights) or unsigned (activations).")
    ] = False,
    step: Annotated[float, typer.Option(help="The step s every quantizer is placed at with set_step(s).")] = 1.0,
    value_range: Annotated[
        Optional[tuple[float, float]],
        typer.Option("--range", help="LO HI of v (default: 0 (Q_P+1)s unsigned, -(Q_N+1)s (Q_P+1)s signed)."),
    ] = None,
    points: Annotated[int, typer.Option(help="Grid points in v.")] = 2001,
    out: Annotated[str, typer.Option(help="Output directory.")] = "reports",
    name: Annotated[
        Optional[str], typer.Option(help="File stem (default: figure2 for 2-bit unsigned, else figure2-<b>bit-<signed|unsigned>).")
    ] = None,
    input_grad: Annotated[bool, typer.Option("--input-grad", help="Add panel C, d output / dv.")] = False,
    set_option: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Quantizer option NAME.KEY=VALUE, e.g. lsq.grad_scale=full (repeatable)."),
    ] = None,
) -> None:
    """Draw LSQ's Figure 2 (output and d output / d step-or-width parameter) from each quantizer's autograd."""
    import time
    from pathlib import Path

    from quantbench.analyses import figure2

    quantizers.load_plugins(plugin or [])
    overrides: dict[str, dict[str, Any]] = {}
    for key, values in parse_set(set_option).items():
        quantizer_name = key.partition(".")[0]
        overrides[quantizer_name] = {**overrides.get(quantizer_name, {}),
                                     **single_options({key: values}, quantizer_name, "fig2")}
    lo, hi = value_range if value_range is not None else (None, None)
    started = time.perf_counter()
    data = figure2.figure2_data(
        quantizer_names.split(","), bits=bits, signed=signed, step=step, lo=lo, hi=hi, points=points, options=overrides
    )
    evaluated = time.perf_counter() - started
    stem = Path(out) / (name or figure2.default_stem(bits, signed))
    written = figure2.write_figure2(data, stem, with_input_grad=input_grad)
    console.print(
        f"evaluated {data['quantizer'].nunique()} quantizers at {points} points in {evaluated:.2f} s; "
        f"drawn in {time.perf_counter() - started - evaluated:.2f} s"
    )
    for path in written:
        console.print(f"wrote {escape(str(path))}")


