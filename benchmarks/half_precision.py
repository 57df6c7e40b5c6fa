"""What half-precision inputs did to each quantizer before quantbench quantized them in float32, and what they do now.

    python -m benchmarks.half_precision [--numel 65536] [--out reports/benchmarks]

For every registered quantizer, bits 2/4/8, signed and unsigned, float16 and bfloat16: the same input (a float32
tensor rounded to the half dtype, so every path sees the same values) quantized

* ``in dtype``: the quantizer's own ``quantize`` on the half tensor, what ``Quantizer.forward`` did before it cast
  half inputs to float32 (all arithmetic in the half dtype);
* ``float32 path``: ``quantizer(v)`` as today (float32 inside, the input's dtype out);

against the float32 reference ``quantizer(v.float())`` cast to the half dtype. Reported: the fraction of elements
whose output differs from the reference, the largest distance from it in steps, and the relative error of the step
(first range parameter) gradient. Writes ``half-precision.csv`` and ``half-precision.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

import quantizers
from benchmarks.machine import cpu_model
from benchmarks.report import markdown_table

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _run(quantizer: quantizers.Quantizer, v: torch.Tensor, upstream: torch.Tensor, own_dtype: bool):
    for parameter in quantizer.parameters():
        parameter.grad = None
    leaf = v.detach().clone().requires_grad_(True)
    out = quantizer.quantize(leaf) if own_dtype else quantizer(leaf)
    out.backward(upstream.to(out.dtype))
    primary = next(iter(quantizer.range_parameters().values()), None)
    return out.detach(), (primary.grad.clone() if primary is not None and primary.grad is not None else None)


def measure(name: str, bits: int, signed: bool, dtype: torch.dtype, numel: int) -> list[dict]:
    generator = torch.Generator().manual_seed(bits * 2 + signed)
    v = (torch.randn(numel, generator=generator) * 1.5).to(dtype)
    upstream = torch.randn(numel, generator=generator).to(dtype)
    quantizer = quantizers.create(name, bits=bits, signed=signed)
    quantizer(v.float())  # initialized from the same float32 data for every path
    reference, reference_grad = _run(quantizer, v.float(), upstream.float(), own_dtype=False)
    reference = reference.to(dtype).float()
    step = quantizer.current_step()
    rows = []
    for path, own_dtype in (("in dtype (before)", True), ("float32 path (now)", False)):
        out, grad = _run(quantizer, v, upstream, own_dtype)
        off = (out.float() - reference).abs()
        gradient_error = (float((grad.float() - reference_grad).abs().max() / reference_grad.abs().max().clamp_min(1e-30))
                          if grad is not None and reference_grad is not None else float("nan"))
        rows.append({"quantizer": name, "bits": bits, "signed": signed, "dtype": str(dtype).removeprefix("torch."),
                     "path": path, "elements_off": float((off > 0).float().mean()),
                     "max_off_in_steps": float(off.max() / step), "step_grad_rel_error": gradient_error})
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.half_precision", description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 16)
    parser.add_argument("--out", default="reports/benchmarks")
    args = parser.parse_args(argv)
    rows = [row for name in quantizers.available() for bits in (2, 4, 8) for signed in (False, True)
            for dtype in DTYPES.values() for row in measure(name, bits, signed, dtype, args.numel)]
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "half-precision.csv", index=False)
    summary = frame.groupby(["path", "dtype"]).agg(
        elements_off_max=("elements_off", "max"), max_off_in_steps=("max_off_in_steps", "max"),
        step_grad_rel_error_max=("step_grad_rel_error", "max")).reset_index()
    lsq8 = frame[(frame.quantizer == "lsq") & (frame.bits == 8)][["dtype", "signed", "path", "elements_off",
                                                                     "max_off_in_steps", "step_grad_rel_error"]]
    text = ["# Half-precision inputs, before and after quantizing them in float32", "",
            f"`python -m benchmarks.half_precision --numel {args.numel}` on {cpu_model()}, torch {torch.__version__}. "
            "Worst case over every registered quantizer, bits 2/4/8, signed and unsigned "
            "(per-case rows in `half-precision.csv`). `elements off`: fraction of outputs that differ from the float32 "
            "reference cast to the dtype; `max off in steps`: the largest such difference, in steps; step gradient: "
            "max relative error of the first range parameter's gradient.", "",
            markdown_table(summary, "{:.3g}"), "", "LSQ at 8 bits:", "", markdown_table(lsq8, "{:.3g}"), ""]
    (out / "half-precision.md").write_text("\n".join(text))
    print("\n".join(text))
    return out


if __name__ == "__main__":
    main()
