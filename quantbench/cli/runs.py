"""``quantbench qerror``, ``export`` and ``evaluate``: commands that read a finished run."""

from __future__ import annotations

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
    out: Annotated[Optional[str], typer.Option(help="Export file (default: RUN_DIR/export/model.int.pt).")] = None,
    pack: Annotated[bool, typer.Option("--pack/--no-pack", help="Bit-pack weight codes (b bits each) instead of int8 storage.")] = False,
    data_dir: Annotated[Optional[str], typer.Option(help="Where the dataset lives (default: the run's).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the sizes as JSON to this file.")] = None,
    plugin: PluginOption = None,
) -> None:
    """Write integer weight codes, step sizes and the model description (LSQ Figure 1); report size against fp32."""
    import json
    from pathlib import Path

    from quantbench.export.integer import export_run

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

    from quantbench.export.integer_model import evaluate_paths

    quantizers.load_plugins(plugin or [])
    set_threads(threads)
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


