"""``quantbench train``, ``compare``, ``report`` and ``gradscale``: commands that train."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

import quantizers
from quantbench.cli.app import PluginOption, app, console, csv_list, parse_csv_ints
from quantbench.config import fp_or_bits, parse_set, single_options


@app.command("compare")
def compare_command(
    config_file: Annotated[Optional[str], typer.Option("--config", help="TOML file (see experiments/).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: digits, the quick preset).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model (default: small_cnn).")] = None,
    quantizer_names: Annotated[Optional[str], typer.Option("--quantizers", help="Comma separated, or all (every registered quantizer).")] = None,
    bits: Annotated[Optional[str], typer.Option(help="Comma separated, e.g. 2,3,4,8.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma separated, e.g. 0,1.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Quantized fine-tuning epochs.")] = None,
    fp_epochs: Annotated[Optional[int], typer.Option(help="Full-precision baseline epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[str], typer.Option(help="LR, or a comma-separated sweep (default: the paper's by bits).")] = None,
    weight_decay: Annotated[Optional[str], typer.Option(help="Weight decay, or a sweep (default: the paper's).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine, step, or both: cosine,step.")] = None,
    bn: Annotated[Optional[str], typer.Option(help="BatchNorm after quantized convs: float (paper), fold, or both: float,fold.")] = None,
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
    data_pipeline: Annotated[Optional[str], typer.Option(help="auto, memory or loader (see quantbench train --help).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Comparison directory (default: runs/compare).")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Processes per run: each run is a data-parallel torchrun job (default 1).")] = None,
    fp_from: Annotated[
        Optional[str], typer.Option(help="Reuse the full-precision baselines of another comparison directory.")
    ] = None,
    cell_workers: Annotated[Optional[int], typer.Option("--workers", help="Cells trained at once on this machine by worker processes, cores split between them unless --threads (config key cell_workers; default: 2 for the quick preset, else 1: in this process).")] = None,
    launcher: Annotated[Optional[str], typer.Option(help="workers (this machine), local (submitit's local executor) or slurm (submitit: one array task per cell; returns once submitted).")] = None,
    slurm_partition: Annotated[Optional[str], typer.Option(help="Slurm partition.")] = None,
    slurm_time: Annotated[Optional[str], typer.Option(help="Slurm time limit per cell: minutes or [D-]HH:MM:SS (requeued from its last epoch when it runs out).")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(help="GPUs per cell; G > 1: the cell is a G-process torchrun job.")] = None,
    slurm_array_parallelism: Annotated[Optional[int], typer.Option(help="At most this many cells of an array run at once.")] = None,
    slurm_option: Annotated[Optional[list[str]], typer.Option(help="Any other submitit/sbatch setting KEY=VALUE, e.g. qos=high (repeatable).")] = None,
    plugin: PluginOption = None,
) -> None:
    """Train every quantizer under one recipe over bits and seeds (resumable), then write the report."""
    from rich.markdown import Markdown

    from quantbench.comparison.compare import QUICK_PRESET_WORKERS, build_config, run_compare
    from quantbench.comparison.grid import failed_cells, slurm_settings
    from quantbench.comparison.submit import parse_options
    from quantbench.config import load_config_file
    from quantbench.errors import QuantbenchError
    from quantbench.comparison.published import published_markdown
    from quantbench.comparison.report import table1_markdown, write_report

    quantizers.load_plugins(plugin or [])
    numbers = {"lr": csv_list(lr, float), "weight_decay": csv_list(weight_decay, float), "schedule": csv_list(schedule),
               "bn": csv_list(bn)}
    flags: dict[str, Any] = {
        "dataset": dataset, "model": model, "quantizers": csv_list(quantizer_names), "bits": csv_list(bits, int),
        "seeds": csv_list(seeds, int), "epochs": epochs, "fp_epochs": fp_epochs, "batch_size": batch_size,
        "qil_progressive": qil_progressive, "data_dir": data_dir, "threads": threads, "compile": compile_model,
        "max_train_batches": max_train_batches, "data_pipeline": data_pipeline, "out": out,
        "set": parse_set(set_option) or None,
        "fp_from": fp_from, "nproc_per_node": nproc_per_node, "launcher": launcher,
        "cell_workers": cell_workers if cell_workers is not None or config_file or (nproc_per_node or 1) > 1
        else QUICK_PRESET_WORKERS,  # the quick preset alone: parallel workers (measured faster, README)
    }
    for key, values in numbers.items():
        if values == []:
            raise QuantbenchError(f"--{key.replace('_', '-')} needs at least one value (comma-separated to sweep)")
        flags[key] = None if values is None else values if len(values) > 1 else values[0]
    flags["first_last_bits"] = first_last_bits  # "fp" (full precision) is resolved by build_config
    file_values = load_config_file(config_file) if config_file else None
    flags["slurm"] = slurm_settings(file_values, slurm_partition, slurm_time, gpus_per_node, slurm_array_parallelism,
                                    parse_options(slurm_option))  # [slurm] of the file, then these flags, key by key
    config = build_config(file_values, flags)
    try:
        results = run_compare(config, console=console, plugins=plugin)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished runs are kept; re-run the same command to continue ({config.out})")
        raise typer.Exit(130) from None
    if config.launcher == "slurm":
        console.print(f"follow the grid with: quantbench status {escape(config.out)}; "
                      f"then quantbench report {escape(config.out)}")
        return
    if not results.empty:
        console.print(Markdown(table1_markdown(results)))
        if published_markdown(results):
            console.print(Markdown(published_markdown(results)))  # the paper's numbers beside ours
        # dynamics figures take seconds per precision: `quantbench report` draws them (the report says so)
        console.print(f"report: {escape(str(write_report(config.out, dynamics=False)))}")
    failed = failed_cells(config.out)
    if failed:  # the other cells finished; the report lists these as missing
        for name, error in failed:
            console.print(f"[red]failed[/] {escape(name)}: {escape(error)}")
        console.print(f"{len(failed)} cell(s) failed (logs in {escape(config.out)}/grid/logs); fix and re-run to train them")
        raise typer.Exit(1)


@app.command("report")
def report_command(
    directory: Annotated[str, typer.Argument(help="A quantbench compare directory.")],
    out: Annotated[Optional[str], typer.Option(help="Write the report here (default: DIR), e.g. reports/NAME.")] = None,
    dynamics: Annotated[bool, typer.Option(help="Draw every quantizer's training dynamics side by side (DIR/dynamics) "
                                                "and link them.")] = True,
    plugin: PluginOption = None,
) -> None:
    """(Re)write report.md and its figures from DIR/results.csv; print the paper's Table 1 numbers beside ours."""
    from rich.markdown import Markdown

    from quantbench.comparison.published import published_markdown
    from quantbench.comparison.report import load, write_report

    quantizers.load_plugins(plugin or [])
    path = write_report(directory, out, dynamics=dynamics)
    published = published_markdown(load(directory)[0])
    if published:
        console.print(Markdown(published))
    console.print(f"report: {escape(str(path))}")


def _train_option(name: str, *flags: str) -> Any:
    """A ``train`` option that defaults to "not given": its help and default come from ``TrainConfig``."""
    from quantbench.config import TrainConfig

    return typer.Option(*flags, help=TrainConfig.help(name))


@app.command("train")
def train_command(
    config_file: Annotated[Optional[str], typer.Option("--config", help="TOML or JSON file of train options (a run's config.json works); flags override it.")] = None,
    dataset: Annotated[Optional[str], _train_option("dataset")] = None,
    model: Annotated[Optional[str], _train_option("model")] = None,
    quantizer: Annotated[Optional[str], _train_option("quantizer")] = None,
    bits: Annotated[Optional[int], _train_option("bits")] = None,
    first_last_bits: Annotated[Optional[str], _train_option("first_last_bits")] = None,
    init_from: Annotated[Optional[str], _train_option("init_from")] = None,
    epochs: Annotated[Optional[int], _train_option("epochs")] = None,
    batch_size: Annotated[Optional[int], _train_option("batch_size")] = None,
    lr: Annotated[Optional[float], _train_option("lr")] = None,
    weight_decay: Annotated[Optional[float], _train_option("weight_decay")] = None,
    schedule: Annotated[Optional[str], _train_option("schedule")] = None,
    distill: Annotated[Optional[bool], _train_option("distill", "--distill/--no-distill")] = None,
    seed: Annotated[Optional[int], _train_option("seed")] = None,
    data_dir: Annotated[Optional[str], _train_option("data_dir")] = None,
    download: Annotated[Optional[bool], _train_option("download", "--download/--no-download")] = None,
    device: Annotated[Optional[str], _train_option("device")] = None,
    amp: Annotated[Optional[str], _train_option("amp")] = None,
    sync_bn: Annotated[Optional[bool], _train_option("sync_bn", "--sync-bn/--no-sync-bn")] = None,
    channels_last: Annotated[Optional[bool], _train_option("channels_last", "--channels-last/--no-channels-last")] = None,
    bn: Annotated[Optional[str], _train_option("bn")] = None,
    freeze_bn_epoch: Annotated[Optional[int], _train_option("freeze_bn_epoch")] = None,
    max_train_batches: Annotated[Optional[int], _train_option("max_train_batches")] = None,
    compile_model: Annotated[Optional[bool], _train_option("compile", "--compile/--no-compile")] = None,
    threads: Annotated[Optional[int], _train_option("threads")] = None,
    workers: Annotated[Optional[int], _train_option("workers")] = None,
    data_pipeline: Annotated[Optional[str], _train_option("data_pipeline")] = None,
    dynamics_every: Annotated[Optional[int], _train_option("dynamics_every")] = None,
    oscillation_dampen: Annotated[Optional[float], _train_option("oscillation_dampen")] = None,
    oscillation_freeze: Annotated[Optional[float], _train_option("oscillation_freeze")] = None,
    tensorboard: Annotated[Optional[bool], _train_option("tensorboard", "--tensorboard/--no-tensorboard")] = None,
    set_option: Annotated[
        Optional[list[str]], typer.Option("--set", help="Quantizer option KEY=VALUE for all its quantizers (repeatable).")
    ] = None,
    out: Annotated[Optional[str], _train_option("out")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its last checkpoint.")] = False,
    plugin: PluginOption = None,
) -> None:
    """Train one model: full precision, or a quantized fine-tune from a full-precision checkpoint."""
    from quantbench.config import TrainConfig, load_config_file, merge
    from quantbench.training.distributed import launched_context
    from quantbench.training.run import train

    quantizers.load_plugins(plugin or [])
    flags = {"dataset": dataset, "model": model, "quantizer": quantizer, "bits": bits, "first_last_bits": first_last_bits,
             "init_from": init_from, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
             "schedule": schedule, "distill": distill, "seed": seed, "data_dir": data_dir, "download": download,
             "device": device, "max_train_batches": max_train_batches, "compile": compile_model, "threads": threads,
             "workers": workers, "data_pipeline": data_pipeline, "out": out, "amp": amp, "sync_bn": sync_bn, "channels_last": channels_last,
             "bn": bn, "freeze_bn_epoch": freeze_bn_epoch, "dynamics_every": dynamics_every,
             "oscillation_dampen": oscillation_dampen, "oscillation_freeze": oscillation_freeze, "tensorboard": tensorboard}
    given = merge(load_config_file(config_file) if config_file else None, flags)
    if set_option:
        name = given.get("quantizer")
        given["quantizer_options"] = {**given.get("quantizer_options", {}),
                                      **single_options(parse_set(set_option, name), name, "train")}
    config = TrainConfig.from_layers(given)
    metrics = train(config, resume=resume)
    if launched_context().is_main:  # under torchrun, every rank returns the metrics; one prints them
        console.print(
            f"top1 {metrics['top1']:.2f}%  top5 {metrics['top5']:.2f}%  "
            f"{metrics['wall_time_s']:.1f} s  {metrics['model_size_bits'] / 8 / 1024:.1f} KiB  -> {escape(config.out)}"
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
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (CUDA when available).")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    set_option: Annotated[
        Optional[list[str]], typer.Option("--set", help="Quantizer option KEY=VALUE, e.g. activation_n=sample (repeatable).")
    ] = None,
    out: Annotated[str, typer.Option(help="Output directory for figure4.{csv,json,png,svg}.")] = "runs/gradscale",
    plugin: PluginOption = None,
) -> None:
    """LSQ Figure 4: the step-size / weight update ratio R per layer under g = 1, 1/sqrt(N), 1/sqrt(N*Qp)."""
    from quantbench.analyses import figure4, gradscale

    quantizers.load_plugins(plugin or [])
    config = gradscale.GradScaleConfig(
        dataset=dataset, model=model, bits=parse_csv_ints(bits, "--bits"), iters=iters, init_from=init_from,
        batch_size=batch_size, quantizer=quantizer,
        quantizer_options=single_options(parse_set(set_option, quantizer), quantizer, "gradscale"),
        first_last_bits=fp_or_bits(first_last_bits),
        epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed, data_dir=data_dir, download=download,
        device=device, threads=threads,
    ).resolved()
    df = gradscale.measure_gradscale(config, progress=True)
    for path in figure4.write_figure4(df, out, command=gradscale.command_line(config) + f" --out {out}"):
        console.print(f"wrote {escape(str(path))}")
    console.print(figure4.medians_markdown(df), markup=False)


