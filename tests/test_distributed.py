"""fit under `accelerate launch` with 2 CPU processes (DDP, gloo) matches 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = WORKER.parent.parent


def run(out: Path, processes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = [str(WORKER), str(out), "16"]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        # `--multi_gpu` selects accelerate's torchrun-style launcher (one process per rank); with no GPU present,
        # fit's Accelerator runs each rank on the CPU and DDP all-reduces gradients over gloo.
        launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    single = run(tmp_path / "one.json", 1)
    double = run(tmp_path / "two.json", 2)
    assert single["processes"] == 1 and double["processes"] == 2
    assert double["samples"] == single["samples"] == 12 * 16
    # Same global batches (process i takes every other half-batch of the same permutation), averaged gradients,
    # no dropout: the runs differ only by floating-point summation order.
    assert double["train"] == pytest.approx(single["train"], rel=1e-4)
    assert double["eval"] == pytest.approx(single["eval"], rel=1e-4)
    assert single["train"][-1] < single["train"][0]
