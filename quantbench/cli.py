"""The ``quantbench`` command line (typer). Each command parses its flags, then calls one library function.

Every command takes ``--plugin MODULE_OR_FILE`` (repeatable) so a user's own quantizer is available to it;
``QUANTBENCH_PLUGINS`` and the ``quantbench.quantizers`` entry-point group are read as well. Expected failures
(unknown names, bad bits, missing data, a plugin that does not import) print one line and exit with status 2.
"""

from __future__ import annotations

import ast
import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
        from quantbench.datasets import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def parse_csv_ints(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise quantizers.QuantizerError(f"{what} must be comma-separated integers, e.g. 2,3,4,8; got {text!r}") from None


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """``["grad_scale=numel", "grad_scale_mult=10"]`` -> ``{"grad_scale": "numel", "grad_scale_mult": 10}``."""
    settings: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, raw = pair.partition("=")
        if not separator or not key.strip():
            raise quantizers.QuantizerError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as numel
        settings[key.strip()] = value
    return settings


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
        ("datasets", "quantbench.datasets", "available_datasets", "dataset_info"),
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
    from quantbench.testing import run_checks

    quantizers.load_plugins(plugin or [])
    bit_widths = parse_csv_ints(bits, "--bits")
    with console.status(f"checking '{name}'"):
        report = run_checks(name, bits=bit_widths, examples=examples, options=parse_settings(set_option))
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

    from quantbench import figure2

    quantizers.load_plugins(plugin or [])
    overrides: dict[str, dict[str, Any]] = {}
    for pair in set_option or []:
        quantizer_name, dot, setting = pair.partition(".")
        if not dot or "=" in quantizer_name or not quantizer_name.strip():
            raise quantizers.QuantizerError(f"--set expects NAME.KEY=VALUE (e.g. lsq.grad_scale=full), got {pair!r}")
        overrides.setdefault(quantizer_name.strip(), {}).update(parse_settings([setting]))
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


def parse_sweep(pairs: list[str] | None) -> dict[str, list[Any]]:
    """``["lsq.grad_scale=full,numel"]`` -> ``{"lsq.grad_scale": ["full", "numel"]}``."""
    sweep: dict[str, list[Any]] = {}
    for pair in pairs or []:
        key, separator, raw = pair.partition("=")
        if not separator or "." not in key:
            raise quantizers.QuantizerError(f"--set expects NAME.KEY=V1[,V2...], e.g. lsq.grad_scale=full,numel; got {pair!r}")
        sweep[key.strip()] = [parse_settings([f"value={part}"])["value"] for part in raw.split(",")]
    return sweep


def _csv(text: str | None, cast: Any = str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise quantizers.QuantizerError(f"expected a comma-separated list, got {text!r}") from None


@app.command("compare")
def compare_command(
    config_file: Annotated[Optional[str], typer.Option("--config", help="TOML file (see experiments/).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: digits, the quick preset).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model (default: small_cnn).")] = None,
    quantizer_names: Annotated[Optional[str], typer.Option("--quantizers", help="Comma separated.")] = None,
    bits: Annotated[Optional[str], typer.Option(help="Comma separated, e.g. 2,3,4,8.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma separated, e.g. 0,1.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Quantized fine-tuning epochs.")] = None,
    fp_epochs: Annotated[Optional[int], typer.Option(help="Full-precision baseline epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[str], typer.Option(help="LR, or a comma-separated sweep (default: the paper's by bits).")] = None,
    weight_decay: Annotated[Optional[str], typer.Option(help="Weight decay, or a sweep (default: the paper's).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine, step, or both: cosine,step.")] = None,
    first_last_bits: Annotated[Optional[str], typer.Option(help="Bits of first/last layers, or 'fp'.")] = None,
    set_option: Annotated[
        Optional[list[str]], typer.Option("--set", help="Quantizer option sweep NAME.KEY=V1[,V2...] (repeatable).")
    ] = None,
    qil_progressive: Annotated[
        Optional[bool], typer.Option("--qil-progressive/--no-qil-progressive", help="QIL fine-tuned fp->5->4->3->2 bits.")
    ] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.")] = None,
    compile_model: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the models.")] = None,
    max_train_batches: Annotated[Optional[int], typer.Option(help="Cap batches per epoch (smoke tests).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Comparison directory (default: runs/compare).")] = None,
    fp_from: Annotated[
        Optional[str], typer.Option(help="Reuse the full-precision baselines of another comparison directory.")
    ] = None,
    plugin: PluginOption = None,
) -> None:
    """Train every quantizer under one recipe over bits and seeds (resumable), then write the report."""
    from rich.markdown import Markdown

    from quantbench.compare import build_config, load_config_file, run_compare
    from quantbench.report import table1_markdown, write_report

    quantizers.load_plugins(plugin or [])
    numbers = {"lr": _csv(lr, float), "weight_decay": _csv(weight_decay, float), "schedule": _csv(schedule)}
    flags: dict[str, Any] = {
        "dataset": dataset, "model": model, "quantizers": _csv(quantizer_names), "bits": _csv(bits, int),
        "seeds": _csv(seeds, int), "epochs": epochs, "fp_epochs": fp_epochs, "batch_size": batch_size,
        "qil_progressive": qil_progressive, "data_dir": data_dir, "threads": threads, "compile": compile_model,
        "max_train_batches": max_train_batches, "out": out, "set": parse_sweep(set_option) or None,
        "fp_from": fp_from,
    }
    for key, values in numbers.items():
        flags[key] = None if values is None else values if len(values) > 1 else values[0]
    if first_last_bits is not None:  # "fp" (full precision) is resolved by build_config
        flags["first_last_bits"] = "fp" if first_last_bits.lower() == "fp" else parse_csv_ints(first_last_bits, "--first-last-bits")[0]
    file_values = load_config_file(config_file) if config_file else None
    config = build_config(file_values, flags)
    try:
        results = run_compare(config, console=console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished runs are kept; re-run the same command to continue ({config.out})")
        raise typer.Exit(130) from None
    report = write_report(config.out)
    console.print(Markdown(table1_markdown(results)))
    console.print(f"report: {escape(str(report))}")


@app.command("report")
def report_command(
    directory: Annotated[str, typer.Argument(help="A quantbench compare directory.")],
    out: Annotated[Optional[str], typer.Option(help="Write the report here (default: DIR), e.g. reports/NAME.")] = None,
    plugin: PluginOption = None,
) -> None:
    """(Re)write report.md and its figures from DIR/results.csv."""
    from quantbench.report import write_report

    quantizers.load_plugins(plugin or [])
    console.print(f"report: {escape(str(write_report(directory, out)))}")


@app.command("train")
def train_command(
    dataset: Annotated[str, typer.Option(help="Dataset name (quantbench list).")] = "digits",
    model: Annotated[str, typer.Option(help="Model name (quantbench list).")] = "small_cnn",
    quantizer: Annotated[Optional[str], typer.Option(help="Quantizer name; omit for full precision.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Bit width of weights and activations.")] = None,
    first_last_bits: Annotated[
        str, typer.Option(help="Bits of the first and last layers, or 'fp' to keep them full precision.")
    ] = "8",
    init_from: Annotated[
        Optional[str], typer.Option(help="Full-precision run directory (or state_dict file) to fine-tune from.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[Optional[float], typer.Option(help="Initial LR (default: the paper's, by bits).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (default: the paper's, by bits).")] = None,
    schedule: Annotated[str, typer.Option(help="cosine (paper) or step.")] = "cosine",
    distill: Annotated[bool, typer.Option(help="Knowledge distillation from the --init-from teacher (T=1, equal weights).")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (model init, data order, augmentation).")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives.")] = None,
    download: Annotated[bool, typer.Option(help="Download the dataset when it is not found (needs network).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    max_train_batches: Annotated[Optional[int], typer.Option(help="Cap batches per epoch (smoke tests).")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the whole model.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    set_option: Annotated[
        Optional[list[str]], typer.Option("--set", help="Quantizer option KEY=VALUE for all its quantizers (repeatable).")
    ] = None,
    out: Annotated[str, typer.Option(help="Run directory.")] = "runs/train",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its last checkpoint.")] = False,
    plugin: PluginOption = None,
) -> None:
    """Train one model: full precision, or a quantized fine-tune from a full-precision checkpoint."""
    from quantbench.train import TrainConfig, train

    quantizers.load_plugins(plugin or [])
    config = TrainConfig(
        dataset=dataset, model=model, out=out, quantizer=quantizer, bits=bits,
        first_last_bits=None if first_last_bits.lower() == "fp" else parse_csv_ints(first_last_bits, "--first-last-bits")[0],
        quantizer_options=parse_settings(set_option), init_from=init_from, epochs=epochs, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, schedule=schedule, distill=distill, seed=seed, data_dir=data_dir,
        download=download, device=device, max_train_batches=max_train_batches, compile=compile_model, threads=threads,
    )
    metrics = train(config, resume=resume)
    console.print(
        f"top1 {metrics['top1']:.2f}%  top5 {metrics['top5']:.2f}%  "
        f"{metrics['wall_time_s']:.1f} s  {metrics['model_size_bits'] / 8 / 1024:.1f} KiB  -> {escape(out)}"
    )


@app.command("gradscale")
def gradscale_command(
    dataset: Annotated[str, typer.Option(help="Dataset name (quantbench list).")] = "digits",
    model: Annotated[str, typer.Option(help="Model name (quantbench list).")] = "small_cnn",
    bits: Annotated[str, typer.Option(help="Precisions to measure, comma separated.")] = "2,3,4,8",
    iters: Annotated[int, typer.Option(help="Iterations averaged, centred on the middle of the first epoch.")] = 500,
    init_from: Annotated[
        Optional[str], typer.Option(help="Full-precision run directory (or state_dict file) to fine-tune from.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size (sets the iterations per epoch).")] = 128,
    first_last_bits: Annotated[
        str, typer.Option(help="Bits of the first and last layers, or 'fp' to keep them full precision.")
    ] = "8",
    quantizer: Annotated[str, typer.Option(help="LSQ or a registered subclass of it.")] = "lsq",
    epochs: Annotated[
        Optional[int], typer.Option(help="Planned fine-tune length for the cosine LR (default: paper's, 90; 1 at 8 bits).")
    ] = None,
    lr: Annotated[Optional[float], typer.Option(help="Initial LR (default: the paper's, by bits).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (default: the paper's, by bits).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (model init, data order, augmentation).")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives.")] = None,
    download: Annotated[bool, typer.Option(help="Download the dataset when it is not found (needs network).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    set_option: Annotated[
        Optional[list[str]], typer.Option("--set", help="Quantizer option KEY=VALUE, e.g. activation_n=sample (repeatable).")
    ] = None,
    out: Annotated[str, typer.Option(help="Output directory for figure4.{csv,json,png,svg}.")] = "runs/gradscale",
    plugin: PluginOption = None,
) -> None:
    """LSQ Figure 4: the step-size / weight update ratio R per layer under g = 1, 1/sqrt(N), 1/sqrt(N*Qp)."""
    from quantbench import gradscale

    quantizers.load_plugins(plugin or [])
    config = gradscale.GradScaleConfig(
        dataset=dataset, model=model, bits=parse_csv_ints(bits, "--bits"), iters=iters, init_from=init_from,
        batch_size=batch_size, quantizer=quantizer, quantizer_options=parse_settings(set_option),
        first_last_bits=None if first_last_bits.lower() == "fp" else parse_csv_ints(first_last_bits, "--first-last-bits")[0],
        epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed, data_dir=data_dir, download=download,
        device=device, threads=threads,
    ).resolved()
    df = gradscale.measure_gradscale(config, progress=True)
    for path in gradscale.write_figure4(df, out, command=gradscale.command_line(config) + f" --out {out}"):
        console.print(f"wrote {escape(str(path))}")
    console.print(gradscale.medians_markdown(df), markup=False)


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command("qerror")
def qerror_command(
    run_dir: Annotated[str, typer.Argument(help="A finished quantized run directory (quantbench train --out).")],
    out: Annotated[str, typer.Option(help="Output directory for report.md, qerror.csv, curves.csv, qerror.png.")] = "reports/qerror",
    batch_size: Annotated[int, typer.Option(help="Test images in the one batch whose activations are analysed.")] = 256,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives (default: the run's).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    plugin: PluginOption = None,
) -> None:
    """LSQ section 3.6: how far the learned step is from the MAE-, MSE- and KL-optimal steps, per layer."""
    from quantbench import qerror

    quantizers.load_plugins(plugin or [])
    _set_threads(threads)
    result = qerror.analyze(run_dir, batch_size=batch_size, data_dir=data_dir)
    written = qerror.write_report(result, out, qerror.command_line(run_dir, out, batch_size, data_dir))
    console.print(qerror.layers_markdown(result), markup=False, soft_wrap=True)
    console.print(qerror.averages_markdown(result), markup=False, soft_wrap=True)
    console.print(f"{len(result.summary) // len(qerror.METRICS)} tensors x {result.info['candidates']} steps in "
                  f"{result.info['seconds']:.1f} s")
    for path in written:
        console.print(f"wrote {escape(str(path))}")


@app.command("export")
def export_command(
    run_dir: Annotated[str, typer.Argument(help="A finished quantized run directory (quantbench train --out).")],
    out: Annotated[Optional[str], typer.Option(help="Export file (default: RUN_DIR/export/model.int.pt).")] = None,
    pack: Annotated[bool, typer.Option("--pack/--no-pack", help="Bit-pack weight codes (b bits each) instead of int8 storage.")] = False,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives (default: the run's).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the sizes as JSON to this file.")] = None,
    plugin: PluginOption = None,
) -> None:
    """Write integer weight codes, step sizes and the model description (LSQ Figure 1); report size against fp32."""
    import json
    from pathlib import Path

    from quantbench.integer import export_run

    quantizers.load_plugins(plugin or [])
    result = export_run(run_dir, out=out, pack=pack, data_dir=data_dir)
    table = Table(title=f"integer export of {run_dir}", title_justify="left")
    for column in ("layer", "weight bits", "activation bits", "weights", "s_w", "s_x"):
        table.add_column(column)
    for row in result.layers:
        table.add_row(row["layer"], str(row["weight_bits"]), str(row["activation_bits"]), str(row["weights"]),
                      f"{row['weight_step']:.4g}", f"{row['activation_step']:.4g}")
    console.print(table)
    console.print(
        f"wrote {escape(str(result.path))}: {result.file_bytes:,} bytes "
        f"({'bit-packed' if pack else 'int8'} weight codes), full-precision float32 state_dict {result.fp_bytes:,} "
        f"bytes: {result.file_bytes / result.fp_bytes:.3f}x ({result.fp_bytes / result.file_bytes:.2f}x smaller); "
        f"quantized weight codes alone {result.weight_payload_bits / 8:,.0f} bytes at their bit widths"
    )
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({
            "run_dir": run_dir, "export": str(result.path), "packed": pack, "file_bytes": result.file_bytes,
            "fp32_state_dict_bytes": result.fp_bytes, "run_model_pt_bytes": result.run_model_bytes,
            "weight_code_bits": result.weight_payload_bits, "ratio_to_fp32": result.file_bytes / result.fp_bytes,
            "layers": result.layers,
        }, indent=2) + "\n")
        console.print(f"wrote {escape(json_out)}")


@app.command("evaluate")
def evaluate_command(
    run_dir: Annotated[str, typer.Argument(help="A finished quantized run directory, or an export file (integer path).")],
    path: Annotated[str, typer.Option(help="fake (the fake-quantized float model) or integer (integer codes).")] = "fake",
    compare: Annotated[bool, typer.Option("--compare", help="Run both paths and report how closely they agree.")] = False,
    export: Annotated[Optional[str], typer.Option(help="Export file for the integer path (default: RUN_DIR/export/model.int.pt, else built in memory).")] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 256,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives (default: the run's).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    plugin: PluginOption = None,
) -> None:
    """Top-1/top-5 on the test set through the fake-quantized or the integer path; --compare checks they agree."""
    import json
    from pathlib import Path

    from quantbench.integer import evaluate_paths

    quantizers.load_plugins(plugin or [])
    _set_threads(threads)
    paths = ("fake", "integer") if compare else (path,)
    results = evaluate_paths(run_dir, paths=paths, export=export, data_dir=data_dir, batch_size=batch_size)
    for name in paths:
        console.print(f"{name:8s} top1 {results[name]['top1']:.2f}%  top5 {results[name]['top5']:.2f}%")
    if "export" in results:
        console.print(f"integer model from: {escape(results['export'])}")
    if compare:
        c = results["comparison"]
        console.print(
            f"predictions agree on {c['images'] - c['predictions_differing']}/{c['images']} test images "
            f"({c['prediction_agreement']:.2f}%); max |logit difference| {c['max_abs_logit_diff']:.3g} "
            f"(max |logit| {c['max_abs_logit']:.3g}, relative {c['max_rel_logit_diff']:.2g}; allclose rtol 1e-5: "
            f"{'yes' if c['logits_allclose'] else 'no'}); each integer layer on the fake path's own input: max relative "
            f"difference {c['layer_max_rel_diff']:.2g}; activation codes differing end to end "
            f"{c['activation_codes_differing']:,} of {c['activation_codes']:,} (float32 rounding at a rounding boundary)"
            + (f"; images whose logits are not allclose: {c['images_logits_not_close']}" if not c["logits_allclose"] else "")
        )
    console.print(f"{results['images']} images in {results['seconds']:.1f} s")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {escape(json_out)}")


def main() -> None:
    """Console-script entry point: run the app, turning expected errors into one line and exit status 2."""
    try:
        app()
    except _expected_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
