"""Fixtures shared by the test files; plain helpers are in ``helpers.py``."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from quantbench import cli
from quantizers.kernels import dispatch


@pytest.fixture
def fresh_kernel_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty compiled-kernel caches and failure state for this test only (so it sees first compiles and warnings)."""
    monkeypatch.setattr(dispatch, "_compiled", {})
    monkeypatch.setattr(dispatch, "_compiled_ok", set())
    monkeypatch.setattr(dispatch, "_eager_only", set())
    monkeypatch.setattr(dispatch, "_compile_failure", {})


@pytest.fixture
def cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[[list[str]], str]:
    """Run ``quantbench ARGV`` in this process; assert it exits 2 with one ``error: ...`` line, and return that line."""

    def run(argv: list[str]) -> str:
        monkeypatch.setattr(sys, "argv", ["quantbench", *argv])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 2
        stderr = capsys.readouterr().err.strip()
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
        return stderr

    return run
