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
import math
import statistics
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
from benchmarks.machine import interleaved, load_average, machine_info, warm_allocator
from benchmarks.report import write_report
from benchmarks.settings import (ACTIVATION_SHAPE, BITS, FULL_SIZES, QUICK_ACTIVATION_SHAPE, QUICK_SIZES, SAVED_NUMEL,
                                 TRAIN_BITS)
from quantizers.kernels import dispatch


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
