"""One config path: validation once, when a config is built, with one line naming the fix for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantbench.config import TrainConfig, merge, parse_set, single_options
from quantbench.errors import QuantbenchError


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": 0.0}, "--lr must be positive"),
        ({"lr": -0.1}, "--lr must be positive"),
        ({"batch_size": 0}, "--batch-size must be an integer of at least 1"),
        ({"epochs": 0}, "--epochs must be an integer of at least 1"),
        ({"threads": 0}, "--threads must be an integer of at least 1"),
        ({"quantizer": "lsq"}, "give --quantizer and --bits together"),
        ({"quantizer": "lsq", "bits": 1}, "out of range"),
        ({"schedule": "linear"}, "--schedule must be one of cosine, step"),
        ({"first_last_bits": "seven"}, "--first-last-bits must be a bit width or 'fp'"),
    ],
)
def test_bad_values_fail_when_the_config_is_built(values, message) -> None:
    with pytest.raises(QuantbenchError, match=message):
        TrainConfig(**values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line() -> None:
    with pytest.raises(QuantbenchError, match="CUDA is not available"):
        TrainConfig(device="cuda")


def test_every_field_has_a_one_line_doc() -> None:
    from dataclasses import fields

    assert all(TrainConfig.doc(f.name) and "\n" not in TrainConfig.doc(f.name) for f in fields(TrainConfig))


def test_merge_later_layers_win_and_none_is_not_given() -> None:
    merged = merge({"epochs": 1, "set": {"lsq.grad_scale": "full"}}, {"epochs": 3, "lr": None},
                   {"set": {"lsq.activation_n": ["sample"]}})
    assert merged == {"epochs": 3, "set": {"lsq.grad_scale": ["full"], "lsq.activation_n": ["sample"]}}


def test_one_set_grammar() -> None:
    assert parse_set(["lsq.grad_scale=full,numel", "lsq.grad_scale_mult=10"]) == {
        "lsq.grad_scale": ["full", "numel"], "lsq.grad_scale_mult": [10]}
    assert parse_set(["grad_scale=numel"], default_name="lsq") == {"lsq.grad_scale": ["numel"]}
    with pytest.raises(QuantbenchError, match="--set expects NAME.KEY=VALUE"):
        parse_set(["grad_scale"])
    with pytest.raises(QuantbenchError, match="one value"):
        single_options(parse_set(["lsq.grad_scale=full,numel"]), "lsq", "train")
    with pytest.raises(QuantbenchError, match="not 'pact'"):
        single_options(parse_set(["pact.alpha_l2=0"]), "lsq", "train")


def test_unknown_toml_key_is_one_line(tmp_path: Path, cli_error) -> None:
    preset = tmp_path / "bad.toml"
    preset.write_text("epoch = 3\n")
    assert "unknown compare option(s) epoch" in cli_error(["compare", "--config", str(preset)])


def test_init_from_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path, cli_error) -> None:
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    message = cli_error(["train", "--quantizer", "lsq", "--bits", "2", "--init-from", str(junk),
                               "--out", str(tmp_path / "run")])
    assert "is not a PyTorch checkpoint" in message


def test_a_corrupt_checkpoint_on_resume_is_one_line_and_kept(tmp_path: Path, cli_error) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x80\x02truncated")
    message = cli_error(["train", "--out", str(run), "--resume", "--max-train-batches", "1"])
    assert "checkpoint.pt is corrupt" in message and "delete it" in message
    assert (run / "checkpoint.pt").exists()  # never deleted by quantbench


def test_bad_train_flags_are_one_line(tmp_path: Path, cli_error) -> None:
    assert "--lr must be positive" in cli_error(["train", "--lr", "0", "--out", str(tmp_path)])
    assert "--threads must be" in cli_error(["train", "--threads", "0", "--out", str(tmp_path)])
