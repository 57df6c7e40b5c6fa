"""The quantizer benchmark: op-level forward+backward, bytes saved for backward, and a ResNet-20 training step.

    python -m benchmarks.quantizers [--quick] [--out reports/benchmarks] [--rounds 20] [--threads N]

Everything is measured side by side in one process, in interleaved rounds (each contender once per round, the order
rotated every round), and reported as medians and ratios, so load from other processes affects every contender alike:

1. **ops**: forward+backward of every registered quantizer (unsigned activations, fast path) on 2^16, 2^20, 2^22,
   2^24 elements and one activation shape (ResNet-20's first stage at batch 128), bits 2 and 8, against ``relu`` and
   ``clone`` forward+backward (the floor: one pass each way), torch.ao's fused learnable fake-quant kernel
   (``torch._fake_quantize_learnable_per_tensor_affine``, behind ``_LearnableFakeQuantize``), the LSQ paper's
   pseudocode (Appendix B: gradscale + roundpass with detach), LSQ's compiled kernel (when the default backend is
   the native C one) and LSQ's reference path (``kernels("reference")``).
   Allocation-warm: glibc is told not to return freed memory to the OS (``mallopt``), so big tensors are not
   page-faulted in again on every call; every contender gets the same allocator.
2. **saved**: bytes each contender saves for backward (``saved_tensors_hooks``, distinct storages; the input's own
   storage is counted and flagged).
3. **train**: one training step (forward, cross-entropy, backward, SGD) of pre-activation ResNet-20 at batch 128 in
   full precision and with every conv/linear weight and input quantized (4 bits, first/last 8) by each quantizer,
   eager and with ``torch.compile`` of the whole model (quantizers initialized by one eager step first).

Writes ``ops.csv``, ``saved.csv``, ``train.csv``, ``machine.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import quantizers
from quantizers.kernels import dispatch, native

FULL_SIZES = (1 << 16, 1 << 20, 1 << 22, 1 << 24)
QUICK_SIZES = (1 << 10, 1 << 12)
ACTIVATION_SHAPE = (128, 16, 32, 32)  # ResNet-20's first-stage activations at batch 128 (2^21 elements)
QUICK_ACTIVATION_SHAPE = (2, 4, 8, 8)
BITS = (2, 8)
TRAIN_BITS = 4
SAVED_NUMEL = 1 << 20
NOISY_SPREAD = 0.10  # per-round step ratios spread wider than this (IQR over median) mark the run as disturbed


# ---- machine --------------------------------------------------------------------------------------------------------


def warm_allocator() -> str:
    """Keep freed memory in the process (glibc): no mmap, no trimming, one arena. Returns what was done.

    Without this, whether a step pays for page faults depends on where glibc's adaptive thresholds happen to sit
    (measured here: 0 faults per full-precision ResNet-20 step, ~4,000-10,000 per quantized one, and 2^24-element
    tensors mmapped and faulted in on every call), which measures the allocator, not the quantizer. With this
    setting no contender page-faults in steady state. Every contender runs in this one process under it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
        ok = (libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
              and libc.mallopt(m_arena_max, 1) == 1)
        return ("glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB, M_ARENA_MAX=1)" if ok
                else "mallopt refused: default allocator")
    except OSError:
        return "not glibc: default allocator"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def kernels_description(settings: dispatch.KernelSettings) -> str:
    compiled = f"compiled for >= {settings.min_numel} elements"
    if settings.backend != "native":
        return f"{settings.backend} ({compiled})"
    built = "built" if native.library() is not None else f"unavailable: {native.failure()}"
    qil = "native (torch's SLEEF pow/log)" if native.vector_math() else "compiled (no AVX-512 vector math)"
    return f"native: native C for float32 CPU tensors ({built}; QIL signed/gamma weights {qil}), else {compiled}"


def machine_info(allocator: str) -> dict[str, Any]:
    settings = dispatch.kernel_settings()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "allocator": allocator,
        "kernels": kernels_description(settings),
        "command": "python -m benchmarks.quantizers " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]),
        "load_average_start": load_average(),
    }


# ---- contenders ---------------------------------------------------------------------------------------------------


def paper_pseudocode_lsq(v: Tensor, s: Tensor, bits: int) -> Tensor:
    """LSQ Appendix B, Functions 1-3, for unsigned activations: gradscale and roundpass with detach, clip, rescale."""

    def gradscale(x: Tensor, scale: float) -> Tensor:
        y_out, y_grad = x, x * scale
        return (y_out - y_grad).detach() + y_grad

    def roundpass(x: Tensor) -> Tensor:
        y_out, y_grad = x.round(), x
        return (y_out - y_grad).detach() + y_grad

    qn, qp = 0, 2**bits - 1
    grad_scale_factor = 1.0 / math.sqrt(v.numel() * qp)
    s = gradscale(s, grad_scale_factor)
    v = v / s
    v = torch.clamp(v, qn, qp)
    vbar = roundpass(v)
    return vbar * s


@dataclass
class Contender:
    name: str
    fn: Callable[[Tensor], Tensor]
    params: list[Tensor]


def op_contenders(x: Tensor, bits: int, names: list[str]) -> list[Contender]:
    contenders = [Contender("relu", torch.relu, []), Contender("clone", torch.Tensor.clone, [])]
    built: dict[str, quantizers.Quantizer] = {}
    for name in names:
        quantizer = quantizers.create(name, bits=bits, signed=False)
        with torch.no_grad():
            quantizer(x)  # data-driven init outside the timed region
        built[name] = quantizer
        contenders.append(Contender(name, quantizer, list(quantizer.parameters())))
    step = built["lsq"].step_size.detach() if "lsq" in built else torch.tensor(0.1)

    def lsq_reference(leaf: Tensor, _quantizer=built.get("lsq")) -> Tensor:
        with dispatch.kernels("reference"):
            return _quantizer(leaf)

    def lsq_compiled(leaf: Tensor, _quantizer=built.get("lsq")) -> Tensor:
        with dispatch.kernels("compiled"):
            return _quantizer(leaf)

    if "lsq" in built:
        if dispatch.kernel_settings().backend == "native":
            contenders.append(Contender("lsq (compiled kernel)", lsq_compiled, list(built["lsq"].parameters())))
        contenders.append(Contender("lsq (reference path)", lsq_reference, list(built["lsq"].parameters())))
    qmax = 2**bits - 1
    ao_scale = step.clone().reshape(1).requires_grad_(True)
    ao_zero_point = torch.zeros(1, requires_grad=True)
    ao_factor = 1.0 / math.sqrt(x.numel() * qmax)

    def torch_ao(leaf: Tensor) -> Tensor:
        return torch._fake_quantize_learnable_per_tensor_affine(leaf, ao_scale, ao_zero_point, 0, qmax, ao_factor)

    contenders.append(Contender("torch.ao fused", torch_ao, [ao_scale, ao_zero_point]))
    paper_step = step.clone().requires_grad_(True)
    contenders.append(Contender("paper pseudocode", lambda leaf: paper_pseudocode_lsq(leaf, paper_step, bits), [paper_step]))
    return contenders


def time_forward_backward(contender: Contender, x: Tensor, upstream: Tensor) -> float:
    for parameter in contender.params:
        parameter.grad = None
    leaf = x.detach().requires_grad_(True)
    start = time.perf_counter()
    contender.fn(leaf).backward(upstream)
    return time.perf_counter() - start


def interleaved(runners: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run every runner once per round, rotating the order each round; returns the timed rounds."""
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = runners[name]()
            if index >= warmup:
                samples[name].append(elapsed)
    return samples


def bench_ops(sizes: list[tuple[str, tuple[int, ...]]], names: list[str], rounds: int, warmup: int, log) -> pd.DataFrame:
    rows = []
    for label, shape in sizes:
        for bits in BITS:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=generator)
            upstream = torch.randn(shape, generator=generator)
            contenders = op_contenders(x, bits, names)
            runners = {c.name: (lambda c=c: time_forward_backward(c, x, upstream)) for c in contenders}
            started = time.perf_counter()
            samples = interleaved(runners, rounds, warmup)
            medians = {name: statistics.median(values) for name, values in samples.items()}
            for name, values in samples.items():
                rows.append({
                    "size": label, "numel": x.numel(), "bits": bits, "contender": name,
                    "median_ms": medians[name] * 1e3,
                    "q1_ms": statistics.quantiles(values, n=4)[0] * 1e3 if len(values) > 1 else medians[name] * 1e3,
                    "q3_ms": statistics.quantiles(values, n=4)[2] * 1e3 if len(values) > 1 else medians[name] * 1e3,
                    "rounds": len(values),
                    "vs_relu": medians[name] / medians["relu"],
                    "vs_clone": medians[name] / medians["clone"],
                    "lsq_speedup": medians[name] / medians["lsq"] if "lsq" in medians else float("nan"),
                })
            log(f"ops {label} bits={bits}: {time.perf_counter() - started:.1f}s, "
                f"lsq/relu {medians.get('lsq', float('nan')) / medians['relu']:.2f}x, load {load_average()}")
    return pd.DataFrame(rows)


# ---- bytes saved for backward -------------------------------------------------------------------------------------


def saved_bytes(fn: Callable[[Tensor], Tensor], x: Tensor) -> dict[str, Any]:
    """Tensors saved for backward by ``fn(leaf)``: count, distinct storages, their bytes, and whether the input is one."""
    leaf = x.detach().clone().requires_grad_(True)
    saved: list[Tensor] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn(leaf)
    storages: dict[int, int] = {}
    for tensor in saved:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    input_ptr = leaf.untyped_storage().data_ptr()
    input_bytes = leaf.untyped_storage().nbytes()
    total = sum(storages.values())
    del output
    return {
        "saved_tensors": len(saved),
        "distinct_storages": len(storages),
        "bytes_saved": total,
        "input_saved": input_ptr in storages,
        "bytes_beyond_input": total - storages.get(input_ptr, 0),
        "input_sized_saved": sum(1 for size in storages.values() if size >= input_bytes),
        "input_bytes": input_bytes,
    }


def bench_saved(names: list[str], numel: int) -> pd.DataFrame:
    rows = []
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    for role, signed in (("activation (unsigned)", False), ("weight (signed)", True)):
        if signed:
            contenders = []
            for name in names:
                quantizer = quantizers.create(name, bits=4, signed=True)
                with torch.no_grad():
                    quantizer(x)
                contenders.append(Contender(name, quantizer, []))
        else:
            contenders = op_contenders(x, 4, names)
        for contender in contenders:
            rows.append({"role": role, "contender": contender.name, **saved_bytes(contender.fn, x)})
    return pd.DataFrame(rows)


# ---- ResNet-20 training step --------------------------------------------------------------------------------------


@dataclass
class TrainVariant:
    name: str
    quantizer: str | None
    compiled: bool
    model: nn.Module
    forward: Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer


def build_variant(quantizer: str | None, compiled: bool, images: Tensor, labels: Tensor) -> TrainVariant:
    from quantbench.models import create_model
    from quantbench.qat import QuantConfig, quantize_

    torch.manual_seed(0)
    model = create_model("preact_resnet20", num_classes=10, in_channels=images.shape[1])
    if quantizer is not None:
        quantize_(model, QuantConfig(quantizer, bits=TRAIN_BITS), images)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    variant = TrainVariant(
        f"{quantizer or 'fp'} {'compiled' if compiled else 'eager'}", quantizer, compiled, model, model, optimizer
    )
    train_step(variant, images, labels)  # eager: initializes every quantizer (data-driven init is not traceable)
    if compiled:
        variant.forward = torch.compile(model)
    return variant


def train_step(variant: TrainVariant, images: Tensor, labels: Tensor) -> float:
    from quantbench.qat import regularization

    start = time.perf_counter()
    loss = F.cross_entropy(variant.forward(images), labels)
    if variant.quantizer is not None:
        loss = loss + regularization(variant.model)
    variant.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    variant.optimizer.step()
    return time.perf_counter() - start


def bench_train(names: list[str], batch: int, image: int, rounds: int, warmup: int, compile_models: bool,
                log) -> pd.DataFrame:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, image, image, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    variants: list[TrainVariant] = []
    compile_seconds: dict[str, float] = {}
    for compiled in (False, True) if compile_models else (False,):
        for quantizer in [None, *names]:
            variant = build_variant(quantizer, compiled, images, labels)
            if compiled:
                started = time.perf_counter()
                train_step(variant, images, labels)  # compiles forward and backward
                compile_seconds[variant.name] = time.perf_counter() - started
                log(f"train: compiled {variant.name} in {compile_seconds[variant.name]:.1f}s")
            variants.append(variant)
    runners = {v.name: (lambda v=v: train_step(v, images, labels)) for v in variants}
    started = time.perf_counter()
    samples = interleaved(runners, rounds, warmup)
    log(f"train: {rounds} rounds in {time.perf_counter() - started:.1f}s, load {load_average()}")
    medians = {name: statistics.median(values) for name, values in samples.items()}
    rows = []
    for variant in variants:
        mode = "compiled" if variant.compiled else "eager"
        baseline = f"fp {mode}"
        rows.append({
            "model": "preact_resnet20", "batch": batch, "quantizer": variant.quantizer or "fp", "mode": mode,
            "median_ms": medians[variant.name] * 1e3,
            "q1_ms": statistics.quantiles(samples[variant.name], n=4)[0] * 1e3 if rounds > 1 else medians[variant.name] * 1e3,
            "q3_ms": statistics.quantiles(samples[variant.name], n=4)[2] * 1e3 if rounds > 1 else medians[variant.name] * 1e3,
            "rounds": rounds,
            "vs_fp_same_mode": medians[variant.name] / medians[baseline],
            "vs_fp_eager": medians[variant.name] / medians["fp eager"],
            "compile_s": compile_seconds.get(variant.name, float("nan")),
        })
    for row, variant in zip(rows, variants):
        # How far to trust the ratio: the interquartile range of the per-round ratios (this variant over full
        # precision in the same round) over their median. A host slowdown spanning a whole round cancels here; one
        # that hits some variants of a round and not others does not.
        baseline = samples[f"fp {row['mode']}"]
        ratios = [mine / theirs for mine, theirs in zip(samples[variant.name], baseline)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        row["spread"] = (quartiles[2] - quartiles[0]) / statistics.median(ratios)
    return pd.DataFrame(rows)


# ---- report -------------------------------------------------------------------------------------------------------


def markdown_table(frame: pd.DataFrame, floats: str = "{:.2f}") -> str:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if isinstance(value, float):
                cells.append("n/a" if math.isnan(value) else floats.format(value))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance(ops: pd.DataFrame, saved: pd.DataFrame, train: pd.DataFrame | None) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, checked on this run: (target, measured, met)."""
    checks: list[tuple[str, str, bool | None]] = []

    def op(numel: int, bits: int, contender: str) -> float | None:
        rows = ops[(ops.numel == numel) & (ops.bits == bits) & (ops.contender == contender) & (ops["size"] != "activation")]
        return float(rows.median_ms.iloc[0]) if len(rows) else None

    for numel, label, limit in ((1 << 24, "2^24", 1.3), (1 << 22, "2^22", 1.5)):
        for bits in BITS:
            lsq, relu, ao = op(numel, bits, "lsq"), op(numel, bits, "relu"), op(numel, bits, "torch.ao fused")
            if None in (lsq, relu, ao):
                continue
            checks.append((f"lsq fwd+bwd <= {limit}x relu at {label}, {bits}-bit", f"{lsq / relu:.2f}x", lsq / relu <= limit))
            checks.append((f"lsq >= 5x faster than torch.ao at {label}, {bits}-bit", f"{ao / lsq:.1f}x", ao / lsq >= 5))
    lsq_saved = saved[(saved.contender == "lsq") & (saved.role == "activation (unsigned)")]
    if len(lsq_saved):
        count = int(lsq_saved.input_sized_saved.iloc[0])
        checks.append(("lsq saves at most one input-sized tensor", f"{count} (the input)" if bool(lsq_saved.input_saved.iloc[0]) else str(count), count <= 1))
    if train is not None and len(train):
        def ratio(quantizer: str, mode: str) -> float | None:
            rows = train[(train.quantizer == quantizer) & (train["mode"] == mode)]
            return float(rows.vs_fp_same_mode.iloc[0]) if len(rows) else None

        value = ratio("lsq", "eager")
        if value is not None:
            checks.append(("ResNet-20 step, lsq eager <= 1.2x fp eager", f"{value:.3f}x", value <= 1.2))
        value = ratio("lsq", "compiled")
        if value is not None:
            checks.append(("ResNet-20 step, lsq compiled <= 1.05x fp compiled", f"{value:.3f}x", value <= 1.05))
        for quantizer in ("fixed", "pact", "qil"):
            for mode in ("eager", "compiled"):
                value = ratio(quantizer, mode)
                if value is not None:
                    checks.append((f"ResNet-20 step, {quantizer} {mode} <= 1.3x fp {mode}", f"{value:.3f}x", value <= 1.3))
    return checks


def write_report(out: Path, machine: dict[str, Any], ops: pd.DataFrame, saved: pd.DataFrame,
                 train: pd.DataFrame | None, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ops.to_csv(out / "ops.csv", index=False)
    saved.to_csv(out / "saved.csv", index=False)
    if train is not None:
        train.to_csv(out / "train.csv", index=False)
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")

    lines = ["# Quantizer benchmark" + (" (--quick smoke run: sizes and rounds too small to mean anything)" if quick else ""), ""]
    lines += [f"- command: `{machine['command']}`"]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in machine.items() if key != "command"]
    lines += ["", "Ratios are of medians over interleaved rounds in one process; see the CSV files for quartiles.", ""]

    if train is not None and len(train):
        spread = float(train.spread.max())
        verdict = "quiet" if spread <= NOISY_SPREAD else "**noisy: something else used the CPU; rerun on an idle machine**"
        lines += [f"Training-step noise: the widest interquartile range of per-round ratios to full precision, over "
                  f"their median, is {spread:.1%} ({verdict}; the threshold is {NOISY_SPREAD:.0%}).", ""]
    checks = acceptance(ops, saved, train)
    if checks:
        lines += ["## Targets (issue 7), on this run", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {target} | {measured} | {'yes' if met else 'no'} |" for target, measured, met in checks]
        lines.append("")

    if len(ops):
        lines += ops_markdown(ops)
    if len(saved):
        lines += saved_markdown(saved)
    if train is not None:
        lines += train_markdown(train)
    lines += [f"Load average at the end: {load_average()}", ""]
    (out / "results.md").write_text("\n".join(lines))


def ops_markdown(ops: pd.DataFrame) -> list[str]:
    lines = ["## Forward+backward, ratios", ""]
    lines += ["`vs relu` / `vs clone`: the contender's median over relu's / clone's forward+backward median on the same "
              "tensor; `lsq speedup`: how many times slower than lsq's fast path the contender is.", ""]
    for (label, numel), group in ops.groupby(["size", "numel"], sort=False):
        lines += [f"### {label} ({numel} elements)", ""]
        table = group.pivot_table(index="contender", columns="bits", values=["median_ms", "vs_relu", "vs_clone", "lsq_speedup"],
                                  sort=False)
        flat = pd.DataFrame({"contender": table.index})
        for bits in BITS:
            if ("median_ms", bits) not in table.columns:
                continue
            flat[f"{bits}-bit ms"] = table[("median_ms", bits)].values
            flat[f"{bits}-bit vs relu"] = table[("vs_relu", bits)].values
            flat[f"{bits}-bit vs clone"] = table[("vs_clone", bits)].values
            flat[f"{bits}-bit lsq speedup"] = table[("lsq_speedup", bits)].values
        lines += [markdown_table(flat), ""]
    return lines


def saved_markdown(saved: pd.DataFrame) -> list[str]:
    input_bytes = int(saved.input_bytes.iloc[0])
    lines = ["## Bytes saved for backward", "", f"One tensor of {input_bytes // 4} float32 elements "
             f"({input_bytes} bytes), 4 bits. `input sized` counts distinct saved storages at least as big as the "
              "input, the input included.", ""]
    lines += [markdown_table(saved[["role", "contender", "saved_tensors", "distinct_storages", "bytes_saved",
                                    "input_saved", "bytes_beyond_input", "input_sized_saved"]]), ""]
    return lines


def train_markdown(train: pd.DataFrame) -> list[str]:
    batch = int(train.batch.iloc[0])
    lines = ["## Pre-activation ResNet-20 training step", "",
             f"Batch {batch}, forward + cross-entropy + backward + SGD step; every conv/linear weight and input "
             f"quantized at {TRAIN_BITS} bits (first and last layer 8). `vs fp` is against full precision in the same "
             "mode (eager or compiled).", ""]
    lines += [markdown_table(train[["quantizer", "mode", "median_ms", "spread", "vs_fp_same_mode", "vs_fp_eager", "compile_s"]]), ""]
    return lines


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantizers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 3 rounds, small training batch")
    parser.add_argument("--out", default=None, help="output folder (default reports/benchmarks; --quick: runs/benchmarks-quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per section (default 20; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quantizers", default=None, help="comma-separated (default: every registered quantizer)")
    parser.add_argument("--sections", default="ops,saved,train", help="comma-separated subset of ops,saved,train")
    parser.add_argument("--compile", dest="compile_models", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile'd models (default: yes; --quick: no)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 128; --quick 4)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (3 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    out = Path(args.out or ("runs/benchmarks-quick" if quick else "reports/benchmarks"))
    compile_models = args.compile_models if args.compile_models is not None else not quick
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.quantizers.split(",") if args.quantizers else quantizers.available()
    sections = set(args.sections.split(","))
    allocator = warm_allocator()
    machine = machine_info(allocator)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    log(f"{machine['cpu']}, {machine['logical_cores']} cores, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads, load {machine['load_average_start']}")
    sizes = [(f"2^{int(math.log2(n))}", (n,)) for n in (QUICK_SIZES if quick else FULL_SIZES)]
    shape = QUICK_ACTIVATION_SHAPE if quick else ACTIVATION_SHAPE
    sizes.append(("activation", shape))
    ops = bench_ops(sizes, names, rounds, warmup, log) if "ops" in sections else pd.DataFrame(
        columns=["size", "numel", "bits", "contender", "median_ms", "vs_relu", "vs_clone", "lsq_speedup"])
    saved = bench_saved(names, 1 << 12 if quick else SAVED_NUMEL) if "saved" in sections else pd.DataFrame(
        columns=["role", "contender"])
    if "saved" in sections:
        log("saved: done")
    train = None
    if "train" in sections:
        train = bench_train(names, args.batch or (4 if quick else 128), 16 if quick else 32, rounds, warmup,
                            compile_models, log)
    machine["load_average_end"] = load_average()
    machine["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_report(out, machine, ops, saved, train, quick)
    log(f"wrote {out}/results.md")
    return out


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
