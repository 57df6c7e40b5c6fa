"""The GPU check: what a user with a GPU runs once (a few minutes) to see that quantbench's CUDA path is right.

    python -m benchmarks.gpu_check [--out reports/benchmarks/gpu] [--device cuda]

1. **Fused ops against their reference path**, for every registered quantizer, bits 2/4/8, signed and unsigned,
   float32 / bfloat16 / float16 inputs: outputs must be identical (the compiled Triton kernels divide
   approximately, so a value exactly at a rounding tie may land on the other code: the fraction of elements that
   differ is reported, and the check fails above 1e-4) and parameter gradients within 1e-3 relative (a step
   gradient is a float32 sum of ~10^6 terms of both signs; the two paths sum in different orders).
2. **A quantized pre-activation ResNet-20 training step** (batch 128, lsq 4-bit) against full precision, eager and
   ``torch.compile``d: median ms and the ratio.
3. **A 2-GPU DDP smoke run** (``torchrun --nproc_per_node=2 -m quantbench train`` on digits, 1 epoch) when two GPUs
   exist: it must exit 0 with ``quantizer_state_identical_across_ranks`` true.

Writes ``gpu-check.json`` and ``gpu-check.md`` into ``--out`` and exits 1 when a check fails. ``--device cpu``
runs the same checks on the CPU (a smoke test of the script; the numbers then say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import quantizers
from quantbench.models import create_model
from quantbench.qat import QuantConfig, quantize_
from quantizers.kernels import dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIE_FRACTION = 1e-4  # elements allowed to differ (approximate division at exact rounding ties)


def check_ops(device: torch.device, numel: int) -> list[dict[str, Any]]:
    rows = []
    for name in quantizers.available():
        for bits in (2, 4, 8):
            for signed in (False, True):
                for dtype_name, dtype in DTYPES.items():
                    generator = torch.Generator().manual_seed(bits)
                    v = (torch.randn(numel, generator=generator) * 1.5).to(device, dtype)
                    upstream = torch.randn(numel, generator=generator).to(device, dtype)
                    quantizer = quantizers.create(name, bits=bits, signed=signed).to(device)
                    quantizer(v.float())
                    results = {}
                    for backend in ("reference", "compiled"):
                        with dispatch.kernels(backend, min_numel=1):
                            quantizer.zero_grad(set_to_none=True)
                            leaf = v.clone().requires_grad_(True)
                            out = quantizer(leaf)
                            out.backward(upstream)
                            grads = [p.grad.float() for p in quantizer.parameters() if p.grad is not None]
                            results[backend] = (out.detach(), leaf.grad, grads)
                    (ref_out, _, ref_params), (out, _, params) = results["reference"], results["compiled"]
                    differ = float((out.float() != ref_out.float()).float().mean())
                    param_error = max((float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                                       for a, b in zip(params, ref_params)), default=0.0)
                    rows.append({"quantizer": name, "bits": bits, "signed": signed, "dtype": dtype_name,
                                 "elements_differ": differ, "param_grad_rel_error": param_error,
                                 "ok": differ <= TIE_FRACTION and param_error <= 1e-3 and out.dtype == ref_out.dtype == dtype})
    return rows


def _step_ms(model: torch.nn.Module, forward: Any, images: torch.Tensor, labels: torch.Tensor, rounds: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for index in range(rounds + 3):
        if images.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if images.is_cuda:
            torch.cuda.synchronize()
        if index >= 3:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def check_training_step(device: torch.device, batch: int, rounds: int) -> list[dict[str, Any]]:
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for mode in ("eager", "compiled"):
        timings = {}
        for quantizer in (None, "lsq"):
            torch.manual_seed(0)
            model = create_model("preact_resnet20").to(device)
            if quantizer:
                quantize_(model, QuantConfig(quantizer, bits=4), images[:8])
                model(images)  # initialize eagerly before any compile
            forward = torch.compile(model) if mode == "compiled" else model
            timings[quantizer or "fp"] = _step_ms(model, forward, images, labels, rounds)
        rows.append({"mode": mode, "fp_ms": timings["fp"], "lsq_ms": timings["lsq"],
                     "ratio": timings["lsq"] / timings["fp"]})
    return rows


def check_ddp(out: Path) -> dict[str, Any]:
    if torch.cuda.device_count() < 2:
        return {"ran": False, "reason": f"{torch.cuda.device_count()} GPU(s): needs 2"}
    run = Path(tempfile.mkdtemp()) / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "quantbench",
               "train", "--quantizer", "lsq", "--bits", "2", "--epochs", "1", "--sync-bn", "--out", str(run)]
    result = subprocess.run(command, capture_output=True, text=True)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    return {"ran": True, "exit": result.returncode, "metrics": metrics,
            "ok": result.returncode == 0 and metrics.get("quantizer_state_identical_across_ranks") is True,
            "stderr_tail": result.stderr[-500:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="reports/benchmarks/gpu")
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (this check is for a machine with a GPU; --device cpu smoke-tests it)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ops = check_ops(device, args.numel)
    steps = check_training_step(device, args.batch, args.rounds)
    ddp = check_ddp(out) if device.type == "cuda" else {"ran": False, "reason": "not a CUDA run"}
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:])}
    passed = all(row["ok"] for row in ops) and ddp.get("ok", True)
    (out / "gpu-check.json").write_text(json.dumps({"machine": machine, "passed": passed, "ops": ops,
                                                    "training_step": steps, "ddp": ddp}, indent=2) + "\n")
    failed = [row for row in ops if not row["ok"]]
    lines = [f"# GPU check on {machine['device']} (torch {machine['torch']})", "", f"`{machine['command']}`", "",
             f"- fused ops vs reference: {len(ops) - len(failed)}/{len(ops)} cases pass"
             + (": failing " + ", ".join(f"{r['quantizer']} {r['bits']}-bit {r['dtype']}" for r in failed[:8]) if failed else ""),
             *[f"- ResNet-20 step ({row['mode']}): fp {row['fp_ms']:.2f} ms, lsq 4-bit {row['lsq_ms']:.2f} ms, "
               f"ratio {row['ratio']:.3f}" for row in steps],
             f"- 2-GPU DDP: {ddp}", ""]
    (out / "gpu-check.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
