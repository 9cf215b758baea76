"""fit under `accelerate launch` with 2 CPU processes (DDP, gloo) matches 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        cmd = [
            launcher,
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29517",
            *script,
        ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    result["ranks"] = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]
    result["weights"] = [torch.load(f"{out}.rank{r}.pt") for r in range(processes)]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    folder = tmp_path_factory.mktemp("ddp")
    return {1: run(folder / "one.json", 1), 2: run(folder / "two.json", 2)}


@pytest.mark.slow
def test_two_cpu_processes_match_one(runs):
    single, double = runs[1], runs[2]
    assert single["processes"] == 1 and double["processes"] == 2
    assert double["samples"] == single["samples"] == 12 * 16
    # Same global batches (process i takes every other half-batch of the same permutation), averaged gradients,
    # no dropout: the runs differ only by floating-point summation order.
    assert double["train"] == pytest.approx(single["train"], rel=1e-4)
    assert double["eval"] == pytest.approx(single["eval"], rel=1e-4)
    assert single["train"][-1] < single["train"][0]


@pytest.mark.slow
def test_early_stopping_under_ddp_takes_one_decision_and_restores_the_same_weights(runs):
    single, (rank0, rank1) = runs[1]["ranks"][0], runs[2]["ranks"]
    # Both ranks evaluate the whole (unevenly sharded) loader: the same token count as one process, not half of it.
    assert (
        [e["eval_tokens"] for e in rank0["eval"]]
        == [e["eval_tokens"] for e in single["eval"]]
        == [36 * 15] * 3
    )
    assert rank0["eval"] == rank1["eval"]
    assert [e["eval_nll"] for e in rank0["eval"]] == pytest.approx(
        [e["eval_nll"] for e in single["eval"]], rel=1e-4
    )
    for history in (single, rank0, rank1):
        assert history["stopped_early"] and history["steps"] == 6 and history["best_step"] == 2
    (one,), (first, second) = runs[1]["weights"], runs[2]["weights"]
    for name, value in first.items():
        assert torch.equal(value, second[name]), name  # bit-identical on both ranks
        torch.testing.assert_close(value, one[name], rtol=1e-4, atol=1e-5)  # and the one-process run's


@pytest.mark.slow
def test_gradual_unfreezing_is_refused_on_every_rank_only_under_ddp(runs):
    assert runs[1]["ranks"][0]["unfreezing_refused"] is None
    for rank in runs[2]["ranks"]:
        assert "Gradual unfreezing cannot run on 2 processes" in rank["unfreezing_refused"]
        assert "Fix:" in rank["unfreezing_refused"]
