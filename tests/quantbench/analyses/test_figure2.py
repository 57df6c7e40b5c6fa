"""``quantbench fig2``: LSQ's Figure 2 from each quantizer's autograd, checked against the closed forms of
../shared/docs/quantizers-spec.md section 5 (s = 1, Q_N = 0, Q_P = 3, v in [0, 4])."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import quantizers
from tests.helpers import REPO
from quantbench import cli
from quantbench.analyses import figure2

POINTS = 401  # v = 0, 0.01, ..., 4: exact ties and clip edges are on the grid and must be skipped by the tests
PLUGIN_NAME = "fig2_test_lsq"
PLUGIN_SOURCE = f'''
import torch
from torch import nn

import quantizers


@quantizers.register("{PLUGIN_NAME}")
class PluginLSQ(quantizers.Quantizer):
    """An LSQ written by a user from the straight-through primitives (no fused Function, no gradient scale)."""

    def __init__(self, bits, signed, role=None):
        super().__init__(bits, signed, role)
        self.step_size = nn.Parameter(torch.tensor(1.0))

    def quantize(self, v):
        step = self.step_size
        return quantizers.round_ste(torch.clamp(v / step, -self.qn, self.qp)) * step

    def apply_step(self, step):
        with torch.no_grad():
            self.step_size.fill_(step)
        self.mark_initialized()

    def levels(self):
        return torch.arange(-self.qn, self.qp + 1, dtype=self.step_size.dtype) * self.step_size.detach()
'''


def run_fig2(out: Path, *args: str) -> pd.DataFrame:
    result = CliRunner().invoke(cli.app, ["fig2", "--out", str(out), "--points", str(POINTS), *args])
    assert result.exit_code == 0, (result.output, result.exception)
    stems = {path.stem for path in out.glob("*.csv")}
    assert len(stems) == 1, stems
    (stem,) = stems
    for suffix in (".png", ".svg", ".json"):
        assert (out / f"{stem}{suffix}").stat().st_size > 0
    return pd.read_csv(out / f"{stem}.csv")


def away_from_ties_and_edges(v: np.ndarray, margin: float = 0.02) -> np.ndarray:
    """Points at least ``margin`` from the rounding ties 0.5, 1.5, 2.5 and the clip edges 0 and 3."""
    special = np.array([0.0, 0.5, 1.5, 2.5, 3.0])
    return np.abs(v[:, None] - special[None, :]).min(axis=1) > margin


@pytest.fixture(scope="module")
def default_figure(tmp_path_factory) -> pd.DataFrame:
    return run_fig2(tmp_path_factory.mktemp("fig2-default"))


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fig2-plugin") / "fig2_user_quantizer.py"
    path.write_text(textwrap.dedent(PLUGIN_SOURCE))
    return path


def curve(data: pd.DataFrame, name: str) -> pd.DataFrame:
    rows = data[data["quantizer"] == name]
    assert len(rows) == POINTS, f"{name}: {len(rows)} rows"
    return rows[away_from_ties_and_edges(rows["v"].to_numpy())]


def test_default_call_is_the_papers_operating_point(default_figure):
    assert list(dict.fromkeys(default_figure["quantizer"])) == ["lsq", "qil", "pact"]
    assert set(default_figure["bits"]) == {2} and set(default_figure["signed"]) == {False}
    assert set(default_figure["step"]) == {1.0}
    assert set(default_figure["qn"]) == {0} and set(default_figure["qp"]) == {3}
    assert default_figure["v"].min() == 0.0 and default_figure["v"].max() == 4.0
    names = default_figure.groupby("quantizer")["param_name"].first().to_dict()
    assert names == {"lsq": "step_size", "qil": "distance", "pact": "alpha"}


@pytest.mark.parametrize("name", ["lsq", "qil", "pact"])
def test_panel_a_is_the_same_staircase_for_every_method(default_figure, name):
    rows = curve(default_figure, name)
    v = rows["v"].to_numpy()
    np.testing.assert_allclose(rows["output_plotted"], np.round(np.clip(v, 0, 3)), atol=1e-12)


def test_panel_b_lsq_matches_closed_form(default_figure):
    rows = curve(default_figure, "lsq")
    v = rows["v"].to_numpy()
    expected = np.where(v < 3, -v + np.round(v), 3.0)
    np.testing.assert_allclose(rows["grad_param"], expected, atol=1e-9)


def test_panel_b_qil_matches_closed_form(default_figure):
    rows = curve(default_figure, "qil")
    v = rows["v"].to_numpy()
    expected = np.where(v < 3, (1.5 - v) / 4.5, 0.0)
    np.testing.assert_allclose(rows["grad_param"], expected, atol=1e-9)
    # the paper plots QIL's normalized output x_bar: raw output in [0, 1], shown at v's scale (x3) in panel A
    assert set(rows["plot_scale"]) == {3.0}
    np.testing.assert_allclose(rows["output"], np.round(np.clip(v, 0, 3)) / 3, atol=1e-12)


def test_panel_b_pact_matches_closed_form(default_figure):
    rows = curve(default_figure, "pact")
    v = rows["v"].to_numpy()
    np.testing.assert_allclose(rows["grad_param"], np.where(v < 3, 0.0, 1.0), atol=1e-12)


def test_input_gradient_is_straight_through_inside_the_clip_range(default_figure):
    for name, inside_slope in (("lsq", 1.0), ("pact", 1.0), ("qil", 1.0 / 3)):
        rows = curve(default_figure, name)
        v = rows["v"].to_numpy()
        np.testing.assert_allclose(rows["grad_input"], np.where(v < 3, inside_slope, 0.0), atol=1e-12)


def test_plugin_quantizer_and_fixed_appear_in_csv_and_figure(tmp_path, plugin_file):
    data = run_fig2(tmp_path, "--plugin", str(plugin_file), "--quantizers", f"lsq,{PLUGIN_NAME},fixed", "--input-grad")
    assert list(dict.fromkeys(data["quantizer"])) == ["lsq", PLUGIN_NAME, "fixed"]
    # the plugin's curves come from its own autograd with no edit to quantbench: its LSQ equals the built-in one
    plugin, lsq = curve(data, PLUGIN_NAME), curve(data, "lsq")
    assert set(plugin["param_name"]) == {"step_size"}
    for column in ("output", "grad_param", "grad_input"):
        np.testing.assert_allclose(plugin[column].to_numpy(), lsq[column].to_numpy(), atol=1e-12)
    # fixed learns nothing: kept, named as such, with no parameter gradient
    fixed = data[data["quantizer"] == "fixed"]
    assert len(fixed) == POINTS
    assert set(fixed["param_name"]) == {figure2.NO_PARAMETER}
    assert fixed["grad_param"].isna().all()
    svg = (tmp_path / "figure2.svg").read_text()
    assert f"{PLUGIN_NAME} (d/d step_size)" in svg
    assert "fixed (no learnable parameter)" in svg
    sidecar = json.loads((tmp_path / "figure2.json").read_text())
    assert sidecar["quantizers"][PLUGIN_NAME]["metadata"]["quantizer"] == PLUGIN_NAME
    assert sidecar["figure_options"] == {"lsq": {"grad_scale": "none"}}


def test_set_overrides_the_paper_options_and_signed_default_range(tmp_path):
    data = run_fig2(tmp_path, "--bits", "3", "--signed", "--quantizers", "lsq,qil", "--set", "qil.output_scale=clip")
    assert (tmp_path / "figure2-3bit-signed.png").exists()
    assert data["v"].min() == -5.0 and data["v"].max() == 4.0  # one step beyond -Q_N s and Q_P s
    assert set(data["qn"]) == {4} and set(data["qp"]) == {3}
    qil = data[data["quantizer"] == "qil"]
    assert set(qil["plot_scale"]) == {1.0}  # output_scale=clip is already at v's scale
    sidecar = json.loads((tmp_path / "figure2-3bit-signed.json").read_text())
    assert sidecar["quantizers"]["qil"]["metadata"]["output_scale"] == "clip"


def test_committed_figure_is_what_the_code_computes():
    committed = REPO / "reports" / "figure2.csv"
    assert committed.exists(), "generate it with: quantbench fig2"
    saved = pd.read_csv(committed)
    fresh = figure2.figure2_data()
    assert list(saved["quantizer"]) == list(fresh["quantizer"])
    for column in ("v", "output", "output_plotted", "grad_param", "grad_input"):
        np.testing.assert_allclose(saved[column], fresh[column], atol=1e-9, err_msg=column)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantizers", "lsq,nope"], "unknown quantizer 'nope'"),
        (["--bits", "1"], "bits=1 is out of range"),
        (["--range", "2", "1"], "--range needs finite LO < HI"),
        (["--points", "1"], "--points must be an integer"),
        (["--set", "grad_scale=full"], "--set expects NAME.KEY=VALUE"),
        (["--set", "fixed.mode=max"], "not in --quantizers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, cli_error, tmp_path):
    assert message in cli_error(["fig2", "--out", str(tmp_path), *args])
    assert not list(tmp_path.iterdir())  # nothing written


def test_console_script_reports_bad_input_on_one_line(tmp_path):
    script = Path(sys.executable).with_name("quantbench")
    result = subprocess.run(
        [str(script), "fig2", "--quantizers", "lsq,nope", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown quantizer 'nope'")
    assert quantizers.available()  # the registry itself still works in this process
