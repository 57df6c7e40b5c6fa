"""The registry, plugin loading (entry points, --plugin, QUANTBENCH_PLUGINS), clear errors for bad input, and the
conformance kit's ability to catch broken quantizers."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import quantizers
from tests.helpers import REPO, run_cli
from quantbench.cli import app
from quantizers.conformance import run_checks
from quantizers import Quantizer, QuantizerError, round_ste, scale_grad



def readme_plugin_example() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its plugin example block"
    return match.group(1)


# ---- registry ------------------------------------------------------------------------------------------------------


def test_builtins_are_registered_with_descriptions() -> None:
    builtins = {"lsq", "qil", "pact", "fixed", "lsq_plus", "dsq", "apot", "ewgs", "n2uq", "tqt", "dorefa"}
    assert builtins <= set(quantizers.available())
    for name in builtins:
        assert quantizers.get(name).description


def test_unknown_name_lists_available() -> None:
    with pytest.raises(QuantizerError, match=r"unknown quantizer 'nope'; available: (.*, )?fixed, (.*, )?lsq, (.*, )?pact, qil(, .*)?"):
        quantizers.create("nope", bits=2, signed=False)


def test_registering_a_taken_name_fails() -> None:
    with pytest.raises(QuantizerError, match="already taken"):

        @quantizers.register("lsq")
        class Impostor(Quantizer):
            pass


def test_register_needs_a_quantizer_subclass() -> None:
    with pytest.raises(QuantizerError, match="subclass of quantizers.Quantizer"):
        quantizers.register("not_a_quantizer")(torch.nn.ReLU)


@pytest.mark.parametrize("bits", [1, 0, 17, 2.5, True, "4"])
def test_bits_out_of_range_are_refused(bits) -> None:
    with pytest.raises(QuantizerError, match="bits"):
        quantizers.create("lsq", bits=bits, signed=False)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(QuantizerError, match="has no option 'grad_scael'; its options are: .*grad_scale"):
        quantizers.create("lsq", bits=2, signed=False, grad_scael="full")
    with pytest.raises(QuantizerError, match="grad_scale must be one of full, numel, none"):
        quantizers.create("lsq", bits=2, signed=False, grad_scale="half")


@pytest.mark.parametrize("name", ["lsq", "qil", "pact", "fixed"])
def test_non_float_tensors_are_refused(name: str) -> None:
    with pytest.raises(QuantizerError, match=r"needs a floating-point tensor, got torch.int64; convert it with .float\(\)"):
        quantizers.create(name, bits=4, signed=True)(torch.arange(10))


def test_bad_steps_are_refused() -> None:
    quantizer = quantizers.create("lsq", bits=4, signed=True)
    for step in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(QuantizerError, match="positive finite"):
            quantizer.set_step(step)


# ---- plugins ---------------------------------------------------------------------------------------------------


def test_readme_plugin_example_is_short_and_passes_check(tmp_path: Path) -> None:
    source = readme_plugin_example()
    assert len(source.strip().splitlines()) <= 40
    (tmp_path / "my_quantizer.py").write_text(source)
    result = run_cli("check", "lsq_offset", "--plugin", "my_quantizer.py", "--examples", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gradients" in result.stdout and "FAIL" not in result.stdout


@pytest.mark.slow
def test_plugin_by_module_path_env_var_and_entry_point(tmp_path: Path) -> None:
    (tmp_path / "my_quantizer.py").write_text(readme_plugin_example())
    by_module = run_cli("list", "--plugin", "my_quantizer", cwd=tmp_path)
    assert by_module.returncode == 0 and "lsq_offset" in by_module.stdout, by_module.stderr
    by_env = run_cli("list", cwd=tmp_path, env={"QUANTBENCH_PLUGINS": str(tmp_path / "my_quantizer.py")})
    assert by_env.returncode == 0 and "lsq_offset" in by_env.stdout, by_env.stderr
    # an installed distribution advertising the entry point (a dist-info directory is what pip writes)
    dist = tmp_path / "site" / "myquant-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myquant\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[quantbench.quantizers]\nlsq_offset = my_quantizer\n")
    (tmp_path / "site" / "my_quantizer.py").write_text(readme_plugin_example())
    by_entry_point = run_cli("list", env={"PYTHONPATH": str(tmp_path / "site")})
    assert by_entry_point.returncode == 0 and "lsq_offset" in by_entry_point.stdout, by_entry_point.stderr


@pytest.mark.slow
def test_plugin_that_does_not_import_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import this_package_does_not_exist\n")
    for plugin in ("broken.py", "no_such_module"):
        result = run_cli("check", "lsq", "--plugin", plugin, cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: could not import plugin '{plugin}'"), result.stderr
    with pytest.raises(QuantizerError, match="could not import plugin"):
        quantizers.load_plugins(["no_such_module_either"])


def test_cli_bad_input_is_one_line() -> None:
    unknown = run_cli("check", "nope")
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        "error: unknown quantizer 'nope'; available: apot, dorefa, dsq, ewgs, faq, fixed, lq_nets, lsq, lsq_plus, msqe_reg, "
        "n2uq, nice, pact, qil, tqt "
        "(load your own with --plugin MODULE)"
    ]
    bits = run_cli("check", "lsq", "--bits", "1")
    assert bits.returncode == 2 and "bits=1 is out of range: choose 2..16" in bits.stderr


def test_cli_list_shows_the_four_quantizers() -> None:
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("lsq", "qil", "pact", "fixed"):
        assert re.search(rf"│ {name}\s+│", result.stdout)


# ---- the kit catches broken quantizers ------------------------------------------------------------------------------


class _LSQLike(Quantizer):
    """Shared skeleton: a learnable step, set_step and levels; subclasses break one thing each."""

    def __init__(self, bits: int, signed: bool, **kwargs) -> None:
        super().__init__(bits, signed, **kwargs)
        self.step_size = torch.nn.Parameter(torch.tensor(1.0))

    def apply_step(self, step: float) -> None:
        self.step_size.data.fill_(step)
        self.mark_initialized()

    def levels(self) -> torch.Tensor:
        return torch.arange(-self.qn, self.qp + 1) * self.step_size.detach()

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        return (round_ste(torch.clamp(v / self.step_size, -self.qn, self.qp)) * self.step_size).to(v.dtype)


def _register_once(name: str, cls: type[Quantizer]) -> str:
    if name not in quantizers.available():
        quantizers.register(name)(cls)
    return name


def _failed_checks(name: str) -> set[str]:
    report = run_checks(name, bits=(2, 4), examples=8)
    return {result.check for result in report.failures()}


def test_kit_passes_a_correct_user_quantizer() -> None:
    assert _failed_checks(_register_once("test_lsq_like", _LSQLike)) == set()


def test_kit_catches_detach_idiom_not_built_on_primitives() -> None:
    class DetachIdiom(_LSQLike):
        def quantize(self, v):
            z = torch.clamp(v / self.step_size, -self.qn, self.qp)
            return ((z.round() - z).detach() + z) * self.step_size  # STE the surrogate cannot see

    assert "gradients" in _failed_checks(_register_once("test_detach_idiom", DetachIdiom))


def test_kit_catches_a_wrong_backward() -> None:
    class StrayGradient(_LSQLike):
        def quantize(self, v):
            step = scale_grad(self.step_size, 0.5)
            output = round_ste(torch.clamp(v / step, -self.qn, self.qp)) * step
            return output + (self.step_size - self.step_size.detach())  # same forward, extra gradient

    assert "gradients" in _failed_checks(_register_once("test_stray_gradient", StrayGradient))


def test_kit_catches_off_grid_output_and_reinitialization_and_nans() -> None:
    class OffGrid(_LSQLike):
        def quantize(self, v):
            return super().quantize(v) + 0.25 * self.step_size

    class ReInitializes(_LSQLike):
        def forward(self, v):
            self.initialize(v.detach())
            return self.quantize(v)

    class NaNOnZeros(_LSQLike):
        def initialize(self, v):
            self.set_step(float(v.abs().mean()) / float(v.abs().mean()))

    assert "grid" in _failed_checks(_register_once("test_off_grid", OffGrid))
    assert {"init", "state-dict"} <= _failed_checks(_register_once("test_reinit", ReInitializes))
    assert "extremes" in _failed_checks(_register_once("test_nan_zeros", NaNOnZeros))


def test_check_cli_exits_nonzero_on_failure(tmp_path: Path) -> None:
    (tmp_path / "bad_quantizer.py").write_text(
        textwrap.dedent(
            """
            import torch, quantizers
            from quantizers import Quantizer, round_ste

            @quantizers.register("bad")
            class Bad(Quantizer):
                def __init__(self, bits, signed, **kw):
                    super().__init__(bits, signed, **kw)
                    self.step_size = torch.nn.Parameter(torch.tensor(1.0))
                def apply_step(self, step):
                    self.step_size.data.fill_(step); self.mark_initialized()
                def levels(self):
                    return torch.arange(-self.qn, self.qp + 1) * self.step_size.detach()
                def quantize(self, v):
                    return torch.round(v / self.step_size).clamp(-self.qn, self.qp) * self.step_size * 1.01
            """
        )
    )
    result = run_cli("check", "bad", "--plugin", "bad_quantizer.py", "--bits", "2", "--examples", "5", cwd=tmp_path)
    assert result.returncode == 1
    assert "FAIL" in result.stdout


BAD_PLUGINS = {
    "unbuildable": '''
import torch
import quantizers
from quantizers import Quantizer

@quantizers.register("kit_unbuildable")
class Unbuildable(Quantizer):
    def __init__(self, bits, signed, **kwargs):
        raise TypeError("this plugin cannot be built")
    def quantize(self, v):
        return v
''',
    "lost_option": '''
import torch
import quantizers
from quantizers import Quantizer, round_ste

@quantizers.register("kit_lost_option")
class LostOption(Quantizer):
    def __init__(self, bits, signed, sharpness: float = 2.0, **kwargs):
        super().__init__(bits, signed, **kwargs)
        self._sharp = sharpness  # not stored as self.sharpness: options() cannot read it back
        self.register_buffer("step", torch.tensor(1.0))
    def apply_step(self, step):
        self.step.fill_(step)
    def levels(self):
        return torch.arange(-self.qn, self.qp + 1) * self.step
    def quantize(self, v):
        return torch.clamp(round_ste(v / self.step), -self.qn, self.qp) * self.step
''',
}


@pytest.mark.parametrize("kind,name,expected", [("unbuildable", "kit_unbuildable", "cannot build"),
                                                ("lost_option", "kit_lost_option", "not stored under their own name")])
def test_check_exits_non_zero_for_an_unbuildable_plugin_and_lost_options(tmp_path, kind, name, expected) -> None:
    plugin = tmp_path / f"plugin_{kind}.py"
    plugin.write_text(BAD_PLUGINS[kind])
    result = subprocess.run([sys.executable, "-m", "quantbench", "check", name, "--plugin", str(plugin),
                             "--examples", "2", "--bits", "2"], capture_output=True, text=True)
    assert result.returncode != 0, result.stdout
    assert "FAIL" in result.stdout and expected in " ".join(result.stdout.split()), result.stdout


def test_overriding_set_step_is_refused_where_the_class_is_written() -> None:
    with pytest.raises(quantizers.QuantizerError, match="override apply_step"):
        class Legacy(quantizers.Quantizer):  # noqa: F841
            def set_step(self, step):
                pass
