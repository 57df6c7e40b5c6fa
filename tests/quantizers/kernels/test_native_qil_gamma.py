"""QIL's signed / gamma weight kernels (``native_qil_gamma.c``): torch's own SLEEF pow and log, so outputs equal the
reference path bit for bit for every exponent, tails and thread splits included."""

from __future__ import annotations

import pytest
import torch

import quantizers
from quantizers.kernels import dispatch, native
from tests.quantizers.kernels.test_kernels import compare_paths


@pytest.mark.parametrize("numel", [37, 4099, 40000])  # a partial vector, one thread, the threaded split
def test_native_qil_weights_match_reference_for_any_gamma(numel: int, monkeypatch) -> None:
    """QIL's weight kernels (signed, learnable gamma) call torch's own vector pow, so outputs stay identical to the
    reference for every exponent, not only gamma = 1 at init."""
    assert native.library() is not None, native.failure()
    if not native.vector_math():
        pytest.skip("QIL's gamma kernels need torch's AVX512 or AVX2 kernels and a matching build")
    calls = []
    kernel = native.qil_gamma_forward
    monkeypatch.setattr(native, "qil_gamma_forward", lambda *args: calls.append(args) or kernel(*args))
    generator = torch.Generator().manual_seed(numel)
    for gamma in (0.4, 0.77, 1.0, 1.37, 2.0, 3.0):
        for signed, options in ((True, {}), (True, {"output_scale": "normalized"}), (False, {"role": "weight"})):
            quantizer = quantizers.create("qil", bits=3, signed=signed, **options)
            v = torch.randn(numel, generator=generator) * 0.1
            v[: min(numel, 16)] = 0.0
            with torch.no_grad():
                quantizer(v)
                quantizer.gamma.fill_(gamma)
            upstream = torch.randn(numel, generator=generator)
            before = len(calls)
            with dispatch.kernels("native"):
                compare_paths(quantizer, v, upstream, rtol=1e-5)
            assert len(calls) == before + 1, "the fast path did not run the native gamma kernel"


@pytest.mark.parametrize("threads", [1, 2])
def test_native_qil_gamma_kernel_equals_torch_pow_bit_for_bit(threads: int) -> None:
    """The gamma forward's x^gamma is torch's own, tails and thread splits included: with q = 2^24 the rounding keeps
    every bit of x^gamma in [0.5, 1), so a last-bit difference between SLEEF and glibc's powf (about 2% of inputs)
    would show. Sizes: partial blocks, one thread, torch's grain (32768) and uneven splits."""
    assert native.library() is not None, native.failure()
    if not native.vector_math():
        pytest.skip("QIL's gamma kernels need torch's AVX512 or AVX2 kernels and a matching build")
    from quantizers.kernels.qil import _qil_forward_kernel

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # tails of 1-15 elements, per thread: 100014 splits into two 50007s (tail 7) under 2 threads
        for numel in (5, 13, 15, 31, 47, 4111, 32768, 40015, 65550, 100014):
            v = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) * 1.2 - 0.1
            for gamma in torch.linspace(0.3, 3.0, 19).tolist():
                one, half, zero = torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.0)
                expected = _qil_forward_kernel(v, zero, one, half, one, torch.tensor(gamma), one, float(2**24),
                                               has_gamma=True)
                out = native.qil_gamma_forward(native.library(), v, 0.0, 1.0, 0.5, 1.0, gamma, float(2**24), None,
                                               False)
                assert torch.equal(out, expected), f"numel {numel}, gamma {gamma}: {int((out != expected).sum())} differ"
    finally:
        torch.set_num_threads(previous)


def test_native_build_follows_torch_cpu_capability() -> None:
    """The kernels are built for the vector ISA torch runs (ATEN_CPU_CAPABILITY lowers both), so an AVX-512 host tests
    the AVX2 and plain paths too, and QIL's gamma kernels are on exactly where their width matches torch's."""
    assert native.library() is not None, native.failure()
    capability = torch.backends.cpu.get_cpu_capability()
    flags = native.isa_flags()
    width = native.library().qil_vector_width()
    if capability == "AVX512":
        assert width == 16 and native.vector_math()
    elif capability == "AVX2":
        assert "-mno-avx512f" in flags or "-march=native" not in flags
        assert width == 8 and native.vector_math()
    else:
        assert width == 0 and not native.vector_math()
