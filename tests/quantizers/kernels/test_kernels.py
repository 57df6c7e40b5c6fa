"""The fused fast paths of the built-in quantizers against their reference paths (the same maths composed from
round_ste / stop_gradient / scale_grad): identical outputs, gradients equal to rounding, nothing saved for backward
beyond the input, no graph breaks or per-shape recompiles under torch.compile, and an eager fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantizers
from quantizers.conformance import check_quantizer
from quantizers.kernels import dispatch, native

BUILTINS = ("lsq", "fixed", "pact", "qil")  # native C kernels for both roles (n2uq's activations: tests below)
#: every quantizer with a fused op (the four above plus compiled-only ones)
FUSED = BUILTINS + ("dsq", "apot", "ewgs", "n2uq")
BITS = (2, 3, 4, 8)
#: (signed, role): signed weights, unsigned activations, the signed image input
ROLE_CONFIGS = ((True, "weight"), (False, "activation"), (True, "activation"))


def build(name: str, bits: int, signed: bool, role: str, dtype: torch.dtype, **options) -> quantizers.Quantizer:
    extra = {} if role == ("weight" if signed else "activation") else {"role": role}
    return quantizers.create(name, bits=bits, signed=signed, **extra, **options).to(dtype)


def forward_backward(quantizer: quantizers.Quantizer, v: torch.Tensor, upstream: torch.Tensor):
    quantizer.zero_grad(set_to_none=True)
    leaf = v.clone().requires_grad_(True)
    output = quantizer(leaf)
    output.backward(upstream)
    grads = {name: p.grad for name, p in quantizer.named_parameters() if p.grad is not None}
    return output.detach(), leaf.grad, grads


def assert_close(fast: torch.Tensor, reference: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    error = (fast - reference).abs()
    allowed = rtol * reference.abs() + atol
    worst = int((error - allowed).flatten().argmax())
    assert bool((error <= allowed).all()), (
        f"{what}: fast {fast.flatten()[worst].item():.12g} vs reference {reference.flatten()[worst].item():.12g}"
    )


def compare_paths(quantizer, v, upstream, rtol: float) -> None:
    fast = forward_backward(quantizer, v, upstream)
    with dispatch.kernels("reference"):
        reference = forward_backward(quantizer, v, upstream)
    assert torch.equal(fast[0], reference[0]), f"outputs differ at {int((fast[0] != reference[0]).flatten().nonzero()[0])}"
    # absolute floor for sums that cancel: rounding of the summed terms' magnitude (float32: DoReFa's max term
    # cancels against the direct term where tanh saturates, so scale by the output's magnitude too)
    floor = 1e-12 if v.dtype == torch.float64 else 1e-6
    magnitude = max(1.0, float(fast[0].abs().max()))
    atol = floor * float(upstream.abs().max()) if v.dtype == torch.float64 else floor * float(upstream.abs().sum()) * magnitude
    assert_close(fast[1], reference[1], "input gradient", rtol, atol)
    assert fast[2].keys() == reference[2].keys()
    mass = float(upstream.abs().sum()) * (1.0 + float(v.abs().max())) * magnitude
    for name in fast[2]:
        assert_close(fast[2][name], reference[2][name], f"gradient of {name}", rtol, floor * mass)


@st.composite
def cases(draw):
    bits = draw(st.sampled_from(BITS))
    signed, role = draw(st.sampled_from(ROLE_CONFIGS))
    count = draw(st.integers(2, 300))
    scale = 10.0 ** draw(st.floats(-2.0, 1.5))
    seed = draw(st.integers(0, 2**31 - 1))
    return bits, signed, role, count, scale, seed


def _inputs(count: int, scale: float, seed: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(count, generator=generator, dtype=torch.float64) * scale
    v[torch.rand(count, generator=generator) < 0.05] *= 100.0  # some far outside the clip range
    upstream = torch.randn(count, generator=generator, dtype=torch.float64)
    return v.to(dtype), upstream.to(dtype)


@pytest.mark.parametrize("kernel_backend", ["compiled", "eager"])
@pytest.mark.parametrize("name", FUSED)
@settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_fast_and_reference_paths_agree_in_float64(name: str, kernel_backend: str, case) -> None:
    """Identical outputs and gradients within 1e-6 relative, through the compiled kernels (min_numel lowered so the
    generated sizes use them) and through their eager bodies."""
    bits, signed, role, count, scale, seed = case
    quantizer = build(name, bits, signed, role, torch.float64)
    v, upstream = _inputs(count, scale, seed, torch.float64)
    with torch.no_grad():
        quantizer(v)  # data-driven init
    with dispatch.kernels(kernel_backend, min_numel=2):
        compare_paths(quantizer, v, upstream, rtol=1e-6)


@pytest.mark.parametrize("kernel_backend", ["native", "compiled"])
@pytest.mark.parametrize("name", FUSED)
@settings(max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_fast_and_reference_paths_agree_in_float32(name: str, kernel_backend: str, case) -> None:
    """The training dtype: identical outputs; gradients to float32 rounding (sums are taken in another order)."""
    bits, signed, role, count, scale, seed = case
    quantizer = build(name, bits, signed, role, torch.float32)
    v, upstream = _inputs(count, scale, seed, torch.float32)
    with torch.no_grad():
        quantizer(v)
    with dispatch.kernels(kernel_backend, min_numel=2):
        compare_paths(quantizer, v, upstream, rtol=1e-5)


@pytest.mark.parametrize("name", BUILTINS)
def test_native_kernels_match_reference_on_activation_sized_tensors(name: str) -> None:
    """Big enough for the threaded native loops (and their per-thread sums); inputs on and around the boundaries."""
    assert native.library() is not None, native.failure()
    generator = torch.Generator().manual_seed(5)
    for signed, role in ROLE_CONFIGS:
        quantizer = build(name, 3, signed, role, torch.float32)
        v = torch.randn(3, 40, 1000, generator=generator) * 2
        v[0, 0, :50] = 0.0
        with torch.no_grad():
            quantizer(v)
        levels = quantizer.levels()
        v[1, 0, : levels.numel()] = levels  # exactly on the grid and the clip points
        v[1, 1, :2] = torch.tensor([1e30, -1e30])  # far outside (inf: the reference path's step gradient is NaN)
        upstream = torch.randn(v.shape, generator=generator)
        with dispatch.kernels("native"):
            compare_paths(quantizer, v, upstream, rtol=1e-5)
            first, again = forward_backward(quantizer, v, upstream), forward_backward(quantizer, v, upstream)
        for key in first[2]:
            assert torch.equal(first[2][key], again[2][key]), "native parameter gradients are not reproducible"


def test_without_a_c_compiler_native_falls_back_with_one_warning(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    quantizer = quantizers.create("lsq", bits=4, signed=False)
    v, upstream = torch.rand(4096), torch.randn(4096)
    with dispatch.kernels("native"):
        with pytest.warns(RuntimeWarning, match="could not build its native CPU kernels.*no C compiler"):
            first = forward_backward(quantizer, v, upstream)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            forward_backward(quantizer, v, upstream)
    with dispatch.kernels("eager"):
        eager = forward_backward(quantizer, v, upstream)
    assert torch.equal(first[0], eager[0]) and torch.equal(first[1], eager[1])


def test_native_kernels_build_once_into_the_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    assert native.library() is not None, native.failure()
    built = list((tmp_path / "kernels").glob("quantbench_kernels_*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "kernels").iterdir() if p not in built]  # no leftovers


@pytest.mark.parametrize("name", FUSED)
def test_options_that_change_the_fused_op_agree_with_reference(name: str) -> None:
    variants = {
        "lsq": [{"grad_scale": "none"}, {"grad_scale": "numel", "grad_scale_mult": 3.0}],
        "fixed": [{"mode": "max"}],
        "pact": [{"weight_scheme": "symmetric"}, {"detach_max": True}, {"output_scale": "none"}],
        "qil": [{"output_scale": "normalized"}, {"learn_gamma": False}],
        "dsq": [{"learn_alpha": True}, {"alpha": 0.05, "grad_scale": "none"}],
        "apot": [{"weight_norm": "none"}, {"init": "lsq"}],
        "ewgs": [{"output_scale": "normalized"}, {"delta": 0.2}],
        "n2uq": [{"init": "code"}],
    }[name]
    v, upstream = _inputs(257, 1.0, 7, torch.float64)
    role = "activation" if name == "n2uq" else "weight"  # n2uq's fused op is its activation quantizer
    for options in variants:
        for bits in (2, 4):
            quantizer = build(name, bits, True, role, torch.float64, **options)
            with torch.no_grad():
                quantizer(v)
            if name == "qil" and "learn_gamma" not in options:
                with torch.no_grad():
                    quantizer.gamma.fill_(1.7)  # an exponent away from 1
            with dispatch.kernels("compiled", min_numel=2):
                compare_paths(quantizer, v, upstream, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])  # comparison chains up to 4 bits, bucketize above
@pytest.mark.parametrize("kernel_backend", ["compiled", "eager"])
def test_learned_cells_and_levels_agree_with_reference_when_uneven(bits: int, kernel_backend: str) -> None:
    """N2UQ with cells of different widths (the chains must pick each element's own edge and width) and APoT's
    non-uniform levels, on inputs that include every edge, threshold and level exactly."""
    generator = torch.Generator().manual_seed(bits)
    v = torch.randn(3000, generator=generator, dtype=torch.float64) * 2
    upstream = torch.randn(3000, generator=generator, dtype=torch.float64)
    for signed in (False, True):
        n2uq = build("n2uq", bits, signed, "activation", torch.float64)
        apot = build("apot", bits, signed, "activation", torch.float64)
        with torch.no_grad():
            n2uq(v), apot(v)
            n2uq.widths.mul_(0.5 + torch.rand(n2uq.widths.shape, generator=generator, dtype=torch.float64))
            edges, widths = n2uq.edges()
            v[: edges.numel()] = edges
            v[edges.numel(): 2 * edges.numel() - 1] = edges[:-1] + widths / 2  # the forward thresholds
            v[2 * edges.numel(): 2 * edges.numel() + apot.levels().numel()] = apot.levels()
        with dispatch.kernels(kernel_backend, min_numel=2):
            compare_paths(n2uq, v, upstream, rtol=1e-6)
            compare_paths(apot, v, upstream, rtol=1e-6)


@pytest.mark.parametrize("kernel_backend", ["native", "compiled"])
def test_conformance_kit_passes_with_fast_kernels_on_every_size(kernel_backend: str) -> None:
    with dispatch.kernels(kernel_backend, min_numel=2):
        for name in FUSED:
            check_quantizer(name, bits=(2, 8), examples=5, checks=("grid", "extremes", "gradients", "shape-dtype"))


# ---- memory, compile behaviour, fallback --------------------------------------------------------------------------


def saved_storages(fn, x: torch.Tensor) -> tuple[list[int], int]:
    saved = []
    leaf = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(leaf)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    big = [ptr for ptr, size in storages.items() if size >= leaf.untyped_storage().nbytes()]
    return big, leaf.untyped_storage().data_ptr()


@pytest.mark.parametrize("kernel_backend", ["native", "compiled", "eager"])
@pytest.mark.parametrize("name", BUILTINS)
def test_fast_path_saves_nothing_input_sized_but_the_input(name: str, kernel_backend: str) -> None:
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    with dispatch.kernels(kernel_backend, min_numel=1 << 12):
        for signed, role in ROLE_CONFIGS:
            quantizer = build(name, 4, signed, role, torch.float32)
            with torch.no_grad():
                quantizer(x)
            big, input_ptr = saved_storages(quantizer, x)
            assert big == [input_ptr], f"{name} {role}: {len(big)} input-sized saved tensors"


def test_one_compiled_kernel_serves_every_layer_shape() -> None:
    from torch._dynamo.utils import counters

    quantizer = quantizers.create("lsq", bits=4, signed=False)
    shapes = [(8, 16, 32, 32), (8, 32, 16, 16), (70001,), (3, 40000), (8, 64, 8, 16)]
    with dispatch.kernels("compiled", min_numel=1 << 12):
        forward_backward(quantizer, torch.rand(shapes[0]), torch.randn(shapes[0]))
        before = counters["stats"]["unique_graphs"]
        for shape in shapes[1:]:
            output, grad, grads = forward_backward(quantizer, torch.rand(shape), torch.randn(shape))
            assert output.shape == grad.shape == shape and grads["step_size"].shape == ()
        assert counters["stats"]["unique_graphs"] == before, "a new layer shape recompiled the fused kernels"


@pytest.mark.parametrize("name", FUSED)
def test_whole_model_compile_has_no_graph_breaks(name: str) -> None:
    from quantbench.qat import QuantConfig, quantize_

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10),
    )
    x = torch.randn(4, 3, 8, 8)
    quantize_(model, QuantConfig(name, bits=4), x)
    model(x).sum().backward()  # initialize the quantizers eagerly (data-driven init is not traceable)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", FUSED)
def test_whole_model_compile_gives_the_eager_gradients(name: str) -> None:
    """Under torch.compile of a whole model the fused ops run their traced bodies (masks built arithmetically so
    that no boolean tensor is saved for backward); through AOTAutograd they give the eager outputs and gradients."""
    from quantbench.qat import QuantConfig, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10),
    ).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    quantize_(model, QuantConfig(name, bits=3), x)
    model(x)  # initialize eagerly
    if name == "qil":
        for module in model.modules():
            if hasattr(module, "gamma"):
                with torch.no_grad():
                    module.gamma.fill_(1.3)

    def run(forward):
        model.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        output = forward(leaf)
        (output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64).reshape(output.shape)).sum().backward()
        return output.detach(), leaf.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = run(model)
    compiled = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert torch.allclose(compiled[0], eager[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(compiled[1], eager[1], rtol=1e-9, atol=1e-12)
    assert compiled[2].keys() == eager[2].keys()
    for key in eager[2]:
        assert torch.allclose(compiled[2][key], eager[2][key], rtol=1e-9, atol=1e-12), key


def test_compiled_model_matches_eager_model() -> None:
    quantizer = quantizers.create("lsq", bits=3, signed=False)
    v = torch.rand(5000, generator=torch.Generator().manual_seed(3)) * 4
    upstream = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    eager = forward_backward(quantizer, v, upstream)
    compiled = torch.compile(quantizer, fullgraph=True)  # is_compiling(): the bodies are traced into the graph
    output_leaf = v.clone().requires_grad_(True)
    quantizer.zero_grad(set_to_none=True)
    output = compiled(output_leaf)
    output.backward(upstream)
    assert torch.equal(output.detach(), eager[0])
    assert torch.equal(output_leaf.grad, eager[1])
    assert torch.allclose(quantizer.step_size.grad, eager[2]["step_size"], rtol=1e-5)


def test_a_kernel_that_fails_to_compile_falls_back_to_eager_with_one_warning(monkeypatch, fresh_kernel_cache) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    quantizer = quantizers.create("lsq", bits=4, signed=False)
    v, upstream = torch.rand(4096), torch.randn(4096)
    with dispatch.kernels("compiled", min_numel=2):
        with pytest.warns(RuntimeWarning, match="could not compile"):
            first = forward_backward(quantizer, v, upstream)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = forward_backward(quantizer, v, upstream)
    with dispatch.kernels("eager"):
        eager = forward_backward(quantizer, v, upstream)
    assert torch.equal(first[0], eager[0]) and torch.equal(again[1], eager[1])
    assert "cpu" in dispatch._compile_failure


def test_kernel_settings_are_validated_and_restored() -> None:
    before = dispatch.kernel_settings()
    with pytest.raises(ValueError, match="native, compiled, eager, reference"):
        dispatch.set_kernels("fast")
    with dispatch.kernels("reference", min_numel=0) as inside:
        assert inside.backend == "reference" and inside.min_numel == 2
        quantizer = quantizers.create("lsq", bits=2, signed=False)
        big, _ = saved_storages(quantizer, torch.rand(1 << 12))
        assert len(big) >= 2  # the composed path
    assert dispatch.kernel_settings() == before


def test_low_precision_inputs_use_the_eager_bodies_and_match_reference() -> None:
    v, upstream = _inputs(1 << 12, 1.0, 11, torch.bfloat16)
    for name in BUILTINS:
        quantizer = build(name, 4, False, "activation", torch.float32)
        with torch.no_grad():
            quantizer(v)
        with dispatch.kernels("compiled", min_numel=2):
            fast = forward_backward(quantizer, v, upstream)
        with dispatch.kernels("reference"):
            reference = forward_backward(quantizer, v, upstream)
        assert fast[0].dtype == torch.bfloat16 and torch.equal(fast[0], reference[0]), name


@pytest.mark.parametrize("name", ["lsq", "pact", "fixed", "qil"])
def test_channels_last_tensors_take_the_compiled_kernel_and_keep_their_layout(name: str) -> None:
    """A channels_last activation is dense: the fused kernel runs on it in memory order (before, any layout but
    contiguous fell back to eager), and the result keeps the input's memory format and the eager values."""
    quantizer = quantizers.create(name, bits=4, signed=False)
    x = torch.rand(2, 8, 6, 6, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    quantizer(x)
    with dispatch.kernels("eager"):
        eager = forward_backward(quantizer, x, upstream)
    with dispatch.kernels("compiled", min_numel=2):
        assert dispatch._compilable(dispatch.run_kernel, (x,))
        fast = forward_backward(quantizer, x, upstream)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast[0], eager[0]) and torch.allclose(fast[1], eager[1])
    for key in eager[2]:
        torch.testing.assert_close(fast[2][key], eager[2][key], rtol=1e-4, atol=1e-6)
