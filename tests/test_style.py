"""The code and the notebooks stay clean under the project's linter and formatter (ruff, configured in pyproject)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from mfkit.paths import REPO_DIR

RUFF = [sys.executable, "-m", "ruff"]


@pytest.fixture(scope="module", autouse=True)
def ruff_available() -> None:
    if subprocess.run([*RUFF, "--version"], capture_output=True).returncode != 0 and not shutil.which("ruff"):
        pytest.skip("ruff is not installed (it is in the dev extra)")


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_is_clean(command: list[str]) -> None:
    done = subprocess.run([*RUFF, *command], cwd=REPO_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
