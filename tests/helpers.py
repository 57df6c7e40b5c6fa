"""Helpers shared by test files: ``from tests.helpers import ...`` (tests/ is a package, so the repo root is on sys.path).

Fixtures live in ``conftest.py``; plain functions and constants live here so a test module can use them at import
time (e.g. to parametrize).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUANTBENCH = [sys.executable, "-m", "quantbench.cli"]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with the repository first on PYTHONPATH (benchmarks/ and a fresh
    checkout import from there)."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process (so plugin loading and error mapping are what users get)."""
    return subprocess.run([*QUANTBENCH, *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env=subprocess_env(env), timeout=timeout)


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root (for ``benchmarks.*``, which is not installed)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line(error: BaseException | str, *fragments: str) -> None:
    """The message is one line and names every fragment (the promise every bad-input error keeps)."""
    message = str(error)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
