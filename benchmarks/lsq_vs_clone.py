"""Forward+backward time of each quantizer on a 2^22-element tensor, as a ratio to ``tensor.clone()`` forward+backward.

    python -m benchmarks.lsq_vs_clone [--elements 4194304] [--rounds 30]

Rounds are interleaved (clone, then each quantizer, repeated) and the median of each is reported, so machine noise
affects every contender alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import quantizers


def fwd_bwd(fn, x: torch.Tensor, upstream: torch.Tensor) -> float:
    leaf = x.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(leaf).backward(upstream)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()

    x = torch.randn(args.elements)
    upstream = torch.randn(args.elements)
    contenders = {"clone": torch.Tensor.clone}
    for name in ("lsq", "fixed", "pact", "qil"):
        quantizer = quantizers.create(name, bits=args.bits, signed=False)
        quantizer(x)  # initialize outside the timed region
        contenders[name] = quantizer
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(3):  # warm-up (allocator, first-call overheads)
        for name, fn in contenders.items():
            fwd_bwd(fn, x, upstream)
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name].append(fwd_bwd(fn, x, upstream))
    baseline = statistics.median(times["clone"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{args.elements} elements, {args.bits}-bit unsigned, median of {args.rounds} interleaved rounds\n")
    print("| quantizer | forward+backward (ms) | ratio to clone |")
    print("|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e3:.2f} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
