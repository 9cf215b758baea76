"""A notebook killed mid-training and run again resumes from its checkpoint and ends with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARAMS = ["--param", "MAX_STEPS=40", "EVAL_EVERY=8", "PATIENCE=100"]
CHECKPOINTS = "artifacts/checkpoints/03/*/last.pt"  # one folder per configuration (a hash of its knobs)
WEIGHTS = Path("artifacts/models/03-classifier/model.safetensors")


def run_03(output: Path, **popen) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "mfkit.cli",
        "run",
        "--profile",
        "smoke",
        "--only",
        "03",
        "--output",
        str(output),
        *PARAMS,
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)


@pytest.mark.notebooks
@pytest.mark.slow
def test_killed_notebook_resumes_to_identical_weights(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_03(straight).wait(timeout=600) == 0

    victim = run_03(resumed, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(resumed.glob(CHECKPOINTS)):
        assert victim.poll() is None, "the notebook ended before writing its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the runner and its kernel, mid-training
    victim.wait()
    assert not (resumed / WEIGHTS).exists(), "the run finished before it could be killed"

    assert run_03(resumed).wait(timeout=600) == 0
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()
    assert not list(resumed.glob(CHECKPOINTS))  # a finished run leaves nothing to resume
