"""fit under `accelerate launch` with 2 CPU processes (DDP, gloo) matches 1 process with the same global batch, and
what only several processes can show: gradient accumulation, an uneven training loader, an eval_fn's own loader,
dropout, checkpoint and resume, a model with a pooler, and files saved by every process (see tests/ddp_worker.py)."""

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
    # No GPU, even on a machine that has some: 2 ranks on 1 GPU would ask for an invalid device, and the worker's
    # figures are compared with a CPU run (its configs also say cpu=True).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
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
    result["saved"] = {
        name: [torch.load(f"{out}.rank{r}.{name}.pt") for r in range(processes)]
        for name in ("accumulated", "dropout", "uninterrupted", "resumed")
    }
    return result


def assert_equal_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


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
    assert_equal_weights(first, second)  # bit-identical on both ranks
    for name, value in first.items():
        torch.testing.assert_close(value, one[name], rtol=1e-4, atol=1e-5)  # and the one-process run's


@pytest.mark.slow
def test_gradual_unfreezing_is_refused_on_every_rank_only_under_ddp(runs):
    assert runs[1]["ranks"][0]["unfreezing_refused"] is None
    for rank in runs[2]["ranks"]:
        assert "Gradual unfreezing cannot run on 2 processes" in rank["unfreezing_refused"]
        assert "Fix:" in rank["unfreezing_refused"]


@pytest.mark.slow
def test_gradient_accumulation_over_an_uneven_training_loader(runs):
    single, (rank0, rank1) = runs[1]["ranks"][0], runs[2]["ranks"]
    assert rank0["accumulated"] == rank1["accumulated"]
    # Steps 1-3 see the same global micro-batches as one process (accumulated without a gradient sync in between).
    assert rank0["accumulated"]["train"][:3] == pytest.approx(single["accumulated"]["train"][:3], rel=1e-4)
    # Step 4 ends the epoch: one process's last micro-batch has 8 rows; 2 processes make it 8 + 8, the second 8
    # repeated from the epoch's start (accelerate's even batches), so the runs part there, but the ranks agree.
    assert len(rank0["accumulated"]["train"]) == 6
    assert_equal_weights(*runs[2]["saved"]["accumulated"])


@pytest.mark.slow
def test_an_eval_fns_own_loader_is_scored_whole_once_even_at_an_epochs_end(runs):
    single, (rank0, rank1) = runs[1]["ranks"][0], runs[2]["ranks"]
    # 32 rows of 15 predicted tokens, at step 4 and at step 8 (the first epoch's last batch): neither duplicated
    # across the ranks nor cut to the training loader's remainder.
    assert [e["eval_tokens"] for e in rank0["own_loader_eval"]] == [32 * 15] * 2
    assert rank0["own_loader_eval"] == rank1["own_loader_eval"]
    assert [e["eval_nll"] for e in rank0["own_loader_eval"]] == pytest.approx(
        [e["eval_nll"] for e in single["own_loader_eval"]], rel=1e-4
    )


@pytest.mark.slow
def test_ranks_draw_their_own_dropout_masks_and_end_with_the_same_weights(runs):
    rank0, rank1 = runs[2]["ranks"]
    assert len(rank0["dropout_masks"]) == len(rank1["dropout_masks"]) == 4
    assert all(a != b for a, b in zip(rank0["dropout_masks"], rank1["dropout_masks"], strict=True))
    assert_equal_weights(*runs[2]["saved"]["dropout"])


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(runs, processes):
    """With dropout on, so that every rank's own RNG state must come back from the checkpoint."""
    saved = runs[processes]["saved"]
    for uninterrupted, resumed in zip(saved["uninterrupted"], saved["resumed"], strict=True):
        assert_equal_weights(uninterrupted, resumed)
    if processes == 2:
        assert_equal_weights(*saved["resumed"])


@pytest.mark.slow
def test_a_tagger_whose_encoder_has_a_pooler_trains_under_ddp(runs):
    for rank in runs[2]["ranks"]:
        assert rank["tagger_error"] is None
        assert rank["tagger_steps"] == 2


@pytest.mark.slow
def test_a_folder_saved_by_every_process_is_the_main_ones_and_in_place_when_the_save_returns(runs):
    assert [rank["saved_rank_read_back"] for rank in runs[2]["ranks"]] == ["0", "0"]
    assert runs[1]["ranks"][0]["saved_rank_read_back"] == "0"
