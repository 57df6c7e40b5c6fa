"""The paper's published Table 1 numbers beside ours: the data table, the side-by-side markdown, and the table1
preset end to end (compare on digits, every Table 1 method in the report with the paper's numbers)."""

from __future__ import annotations

import tomllib

import pandas as pd
import pytest

import quantizers
from quantbench.comparison.published import FULL_PRECISION_TOP1, PUBLISHED_TOP1, published_markdown
from tests.helpers import REPO, run_cli

TABLE1_METHODS = {"lsq", "qil", "faq", "lq_nets", "pact", "nice", "msqe_reg"}


def test_the_data_table_is_the_lsq_papers_resnet18_rows() -> None:
    paper = (REPO.parent / "shared" / "papers" / "lsq-esser-2020.txt")
    assert set(PUBLISHED_TOP1) == TABLE1_METHODS and FULL_PRECISION_TOP1 == 70.5
    assert all(name in quantizers.available() for name in PUBLISHED_TOP1)
    if not paper.is_file():
        pytest.skip("the paper's text is not next to this checkout")
    text = paper.read_text()
    rows = text[text.index("ResNet-18"):text.index("ResNet-34")].splitlines()
    for quantizer, (method, numbers) in PUBLISHED_TOP1.items():
        line = next(row for row in rows if row.strip().split("\t")[0].replace("<b>", "").startswith(method))
        cells = [cell.replace("<b>", "").replace("</b>", "") for cell in line.strip().split("\t")[1:5]]
        assert {bits: float(cell) for bits, cell in zip((2, 3, 4, 8), cells) if cell} == numbers, quantizer


def test_ours_sit_beside_the_papers_with_a_dash_where_it_published_none() -> None:
    results = pd.DataFrame([
        {"quantizer": "fp", "bits": 32, "seed": 0, "variant": "", "top1": 90.0},
        *[{"quantizer": "faq", "bits": b, "seed": s, "variant": "", "top1": 80.0 + b + s} for b in (2, 4) for s in (0, 1)],
        {"quantizer": "lq_nets", "bits": 4, "seed": 0, "variant": "init_fits=10", "top1": 77.0},
        {"quantizer": "apot", "bits": 4, "seed": 0, "variant": "", "top1": 70.0},  # not in Table 1: no row
    ])
    table = published_markdown(results)
    lines = table.splitlines()
    assert lines[0] == "| method | 2-bit ours | 2-bit paper | 4-bit ours | 4-bit paper |"
    assert "| FAQ (`faq`) | 82.50 | - | 84.50 | 69.8 |" in lines  # FAQ published no 2-bit number
    assert "| LQ-Nets (`lq_nets`, init_fits=10) |  | 64.9 | 77.00 | 69.3 |" in lines
    assert "apot" not in table and "ours 90.00, paper 70.5" in table
    assert published_markdown(results[results["quantizer"] == "apot"]) == ""


def test_the_preset_lists_every_table1_method_and_its_departures() -> None:
    preset = tomllib.loads((REPO / "experiments" / "table1.toml").read_text())
    assert set(preset["quantizers"]) == TABLE1_METHODS and preset["bits"] == [2, 3, 4, 8]
    text = (REPO / "experiments" / "table1.toml").read_text()
    for name in TABLE1_METHODS - {"lsq"}:
        assert f"#   {name}:" in text, name


@pytest.mark.slow
def test_table1_compare_on_digits_reports_every_method_beside_the_paper(tmp_path) -> None:
    out = tmp_path / "t1"
    result = run_cli("compare", "--config", "experiments/table1.toml", "--dataset", "digits", "--model", "small_cnn",
                     "--seeds", "0", "--bits", "2,4", "--fp-epochs", "1", "--max-train-batches", "2", "--out", str(out),
                     timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (out / "report.md").read_text()
    section = report[report.index("## Beside the published numbers"):]
    for quantizer, (method, numbers) in PUBLISHED_TOP1.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| {method} (`{quantizer}`"))
        assert row.count("|") == 6 and (f"{numbers[4]:.1f}" in row), row
    assert "2-bit paper" in result.stdout.replace("\n", " ") or "paper" in result.stdout
