"""LSQ against torch.ao's learnable fake quantization, the way each is called in training, under each setting that
could explain a different ratio: the allocator, torch.ao's zero-point gradient, threads.

    python -m benchmarks.torch_ao [--sizes 22,24] [--bits 2] [--rounds 20] [--threads 2] [--input uniform|normal]

Contenders (forward + backward with respect to the input and the range parameters, unsigned activations):

* ``lsq``: ``quantizers.create("lsq", bits, signed=False)`` called on the tensor (its default native kernel);
* ``torch.ao module``: ``torch.ao.quantization._learnable_fake_quantize._LearnableFakeQuantize`` (``quant_min=0``,
  ``quant_max=2^b-1``, ``use_grad_scaling=True``, a MovingAverageMinMax observer), after
  ``toggle_observer_update(False)`` and ``toggle_qparam_learning(True)``: LSQ-style learning as torch.ao runs it
  (its forward also clamps the scale and reads ``eps.item()`` every call); the scale and zero point learn;
* ``torch.ao kernel``: ``torch._fake_quantize_learnable_per_tensor_affine`` called directly, as that module calls it;
* ``torch.ao kernel, fixed zero point``: the same with a zero point that needs no gradient.

Each setting runs in its own subprocess (the allocator setting cannot be undone in a process): ``warm`` is the
quantizer benchmark's (``benchmarks.machine.warm_allocator``: glibc keeps freed memory, so big tensors are not
page-faulted in on every call), ``default`` is glibc's own. Medians over interleaved rounds; ratio = contender / lsq.

Inputs: ``uniform`` (default), ``4 * U(0, 1)``: non-negative, as an unsigned quantizer sees activations after a ReLU;
``normal``, ``N(0, 1)``: what ``benchmarks.quantizers`` feeds every op, half of it below the unsigned grid at random
positions. torch.ao's kernel branches per element on clipping, so it takes about twice as long on ``normal``; lsq's
time does not depend on the input.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def contenders(x: torch.Tensor, bits: int) -> dict:
    import quantizers
    from torch.ao.quantization import MovingAverageMinMaxObserver
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    qmax = 2**bits - 1
    lsq = quantizers.create("lsq", bits=bits, signed=False)
    with torch.no_grad():
        lsq(x)  # data-driven init outside the timed region
    step = float(lsq.step_size.detach())
    module = _LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=qmax, scale=step,
                                    zero_point=0.0, use_grad_scaling=True)
    module.toggle_observer_update(False)
    module.toggle_qparam_learning(True)
    scale = torch.tensor([step], requires_grad=True)
    zero_point = torch.zeros(1, requires_grad=True)
    fixed_zero_point = torch.zeros(1)
    factor = 1.0 / (x.numel() * qmax) ** 0.5
    return {
        "lsq": (lsq, list(lsq.parameters())),
        "torch.ao module": (module, [module.scale, module.zero_point]),
        "torch.ao kernel": (lambda v: torch._fake_quantize_learnable_per_tensor_affine(v, scale, zero_point, 0, qmax,
                                                                                       factor), [scale, zero_point]),
        "torch.ao kernel, fixed zero point": (
            lambda v: torch._fake_quantize_learnable_per_tensor_affine(v, scale, fixed_zero_point, 0, qmax, factor),
            [scale]),
    }


INPUTS = {"uniform": lambda n, g: torch.rand(n, generator=g) * 4, "normal": lambda n, g: torch.randn(n, generator=g)}


def measure(setting: str, sizes: list[int], bits: int, rounds: int, threads: int,
            input_kind: str = "uniform") -> list[dict]:
    from benchmarks.machine import interleaved, warm_allocator

    allocator = warm_allocator() if setting == "warm" else "glibc default"
    torch.set_num_threads(threads)
    rows = []
    for exponent in sizes:
        generator = torch.Generator().manual_seed(exponent)
        x = INPUTS[input_kind](1 << exponent, generator)
        upstream = torch.randn(1 << exponent, generator=generator)
        built = contenders(x, bits)

        def runner(fn, params):
            def run() -> float:
                for parameter in params:
                    parameter.grad = None
                leaf = x.detach().requires_grad_(True)
                started = time.perf_counter()
                fn(leaf).backward(upstream)
                return time.perf_counter() - started
            return run

        samples = interleaved({name: runner(fn, params) for name, (fn, params) in built.items()}, rounds, warmup=2)
        base = statistics.median(samples["lsq"])
        for name, times in samples.items():
            rows.append({"allocator": allocator, "setting": setting, "input": input_kind,
                         "elements": f"2^{exponent}", "threads": threads, "contender": name, "median_ms": 1e3 * statistics.median(times),
                         "ratio_to_lsq": statistics.median(times) / base})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="22,24", help="log2 of the element counts")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", default="2", help="comma separated")
    parser.add_argument("--settings", default="warm,default")
    parser.add_argument("--input", choices=sorted(INPUTS), default="uniform", help="the input tensor (see above)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        setting, threads = args.child.split(":")
        print(json.dumps(measure(setting, sizes, args.bits, args.rounds, int(threads), args.input)))
        return
    import pandas as pd

    from benchmarks.machine import cpu_model, load_average, write_text_report

    rows = []
    for setting in args.settings.split(","):
        for threads in args.threads.split(","):
            command = [sys.executable, "-m", "benchmarks.torch_ao", "--sizes", args.sizes, "--bits", str(args.bits),
                       "--rounds", str(args.rounds), "--input", args.input, "--child", f"{setting}:{threads}"]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            rows += json.loads(result.stdout.strip().splitlines()[-1])
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["setting", "threads", "elements"], columns="contender", values="ratio_to_lsq",
                              sort=False)
    header = (f"{args.bits}-bit, {args.input} input, {args.rounds} interleaved rounds, {cpu_model()} "
              f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
              f"load {load_average()}; ratio = contender's median forward+backward / lsq's")
    text = f"{header}\n\n{table.to_string(float_format=lambda v: f'{v:.2f}')}\n\nmedian ms:\n" + frame.pivot_table(
        index=["setting", "threads", "elements"], columns="contender", values="median_ms", sort=False).to_string(
        float_format=lambda v: f"{v:.2f}")
    print(text)
    if args.out:
        write_text_report(args.out, "torch_ao", frame, text, "benchmarks.torch_ao", argv)


if __name__ == "__main__":
    main()
