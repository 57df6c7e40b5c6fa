"""``quantbench qerror``, ``export`` and ``evaluate``: commands that read a finished run."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

import quantizers
from quantbench.cli.app import PluginOption, app, console, set_threads


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
    from quantbench.analyses import qerror, qerror_report

    quantizers.load_plugins(plugin or [])
    set_threads(threads)
    result = qerror.analyze(run_dir, batch_size=batch_size, data_dir=data_dir)
    written = qerror_report.write_report(result, out, qerror_report.command_line(run_dir, out, batch_size, data_dir))
    console.print(qerror_report.layers_markdown(result), markup=False, soft_wrap=True)
    console.print(qerror_report.averages_markdown(result), markup=False, soft_wrap=True)
    console.print(f"{len(result.summary) // len(qerror.METRICS)} tensors x {result.info['candidates']} steps in "
                  f"{result.info['seconds']:.1f} s")
    for path in written:
        console.print(f"wrote {escape(str(path))}")


@app.command("export")
def export_command(
    run_dir: Annotated[str, typer.Argument(help="A finished quantized run directory (quantbench train --out).")],
    export_format: Annotated[str, typer.Option("--format", help="integer (quantbench's integer codes, model.int.pt) or onnx (QDQ graph for ONNX Runtime, model.onnx).")] = "integer",
    out: Annotated[Optional[str], typer.Option(help="Export file (default: RUN_DIR/export/model.int.pt, or model.onnx with --format onnx).")] = None,
    pack: Annotated[bool, typer.Option("--pack/--no-pack", help="Bit-pack weight codes (b bits each) instead of int8 storage.")] = False,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives (default: the run's).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the sizes as JSON to this file.")] = None,
    plugin: PluginOption = None,
) -> None:
    """Write integer weight codes, step sizes and the model description (LSQ Figure 1); report size against fp32."""
    from pathlib import Path

    from quantbench.errors import QuantbenchError
    from quantbench.export.integer import export_run, step_text

    quantizers.load_plugins(plugin or [])
    if export_format not in ("integer", "onnx"):
        raise QuantbenchError(f"--format must be integer or onnx, got {export_format!r}")
    if export_format == "onnx":
        _export_onnx(run_dir, out, pack, data_dir, json_out)
        return
    _refuse_folded_integer(run_dir)
    result = export_run(run_dir, out=out, pack=pack, data_dir=data_dir)
    table = Table(title=f"integer export of {run_dir}", title_justify="left")
    for column in ("layer", "weight bits", "activation bits", "weights", "s_w", "s_x"):
        table.add_column(column)
    for row in result.layers:
        table.add_row(row["layer"], str(row["weight_bits"]), str(row["activation_bits"]), str(row["weights"]),
                      step_text(row["weight_step"]), f"{row['activation_step']:.4g}")
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
    path: Annotated[str, typer.Option(help="fake (the fake-quantized float model), integer (integer codes) or onnx (the QDQ graph in ONNX Runtime).")] = "fake",
    compare: Annotated[bool, typer.Option("--compare", help="Run the fake path and --path (integer unless onnx) and report how closely they agree.")] = False,
    export: Annotated[Optional[str], typer.Option(help="Export file of the integer or onnx path (default: RUN_DIR/export/model.int.pt or model.onnx, else built in memory).")] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 256,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives (default: the run's).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    plugin: PluginOption = None,
) -> None:
    """Top-1/top-5 on the test set through the fake-quantized or the integer path; --compare checks they agree."""
    from pathlib import Path

    from quantbench.export.integer_model import evaluate_paths

    quantizers.load_plugins(plugin or [])
    set_threads(threads)
    paths = ("fake", "onnx" if path == "onnx" else "integer") if compare else (path,)
    if "integer" in paths:
        _refuse_folded_integer(run_dir)
    results = evaluate_paths(run_dir, paths=paths, export=export, data_dir=data_dir, batch_size=batch_size)
    for name in paths:
        console.print(f"{name:8s} top1 {results[name]['top1']:.2f}%  top5 {results[name]['top5']:.2f}%")
    if "export" in results:
        console.print(f"{paths[-1]} model from: {escape(results['export'])}")
    if compare and "onnx" in paths:
        c = results["comparison"]
        console.print(
            f"predictions agree on {c['images'] - c['predictions_differing']}/{c['images']} test images "
            f"({c['prediction_agreement']:.2f}%); max |logit difference| {c['max_abs_logit_diff']:.3g} "
            f"(max |logit| {c['max_abs_logit']:.3g}, relative {c['max_rel_logit_diff']:.2g}; allclose rtol 1e-5: "
            f"{'yes' if c['logits_allclose'] else 'no'}) between the fake-quantized model and ONNX Runtime"
        )
    elif compare:
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


def _export_onnx(run_dir: str, out: Optional[str], pack: bool, data_dir: Optional[str], json_out: Optional[str]) -> None:
    """``export --format onnx``: the QDQ graph (quantbench.export.onnx)."""
    from quantbench.errors import QuantbenchError
    from quantbench.export.onnx import export_onnx_run
    from quantbench.utils.io import write_json

    if pack:
        raise QuantbenchError("--pack applies to --format integer; ONNX stores weight codes as int8 initializers")
    result = export_onnx_run(run_dir, out=out, data_dir=data_dir)
    nodes = ", ".join(f"{op} {count}" for op, count in sorted(result.nodes.items()))
    console.print(f"wrote {escape(str(result.path))}: {result.file_bytes:,} bytes, opset {result.opset}, "
                  f"{result.layers} quantized layers; nodes: {nodes}")
    if json_out:
        write_json(json_out, {"run_dir": run_dir, "export": str(result.path), "format": "onnx",
                              "file_bytes": result.file_bytes, "opset": result.opset, "nodes": result.nodes,
                              "quantized_layers": result.layers})
        console.print(f"wrote {escape(json_out)}")


def _refuse_folded_integer(run_dir: str) -> None:
    """The integer format does not hold folded BatchNorm yet (its rebuild expects every BN): one line, not a wrong model."""
    from pathlib import Path

    from quantbench.errors import QuantbenchError

    config = Path(run_dir) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("train", {}).get("bn") == "fold":
        raise QuantbenchError(f"{run_dir} was trained with --bn fold: export and evaluate it with --format onnx / "
                              "--path onnx (the integer format does not hold folded BatchNorm yet)")
