"""Killed notebooks resume: 03 from its checkpoint to the same weights, 11 from its stored trials."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Small enough to run twice side by side in a minute or two; long enough (12 steps after the first checkpoint) that the
# kill lands mid-training.
PARAMS = [
    "--param",
    "MAX_STEPS=16",
    "EVAL_EVERY=4",
    "BATCH_SIZE=8",
    "TRAIN_LIMIT=128",
    "EVAL_LIMIT=32",
    "PATIENCE=100",
]
CHECKPOINTS = "artifacts/checkpoints/03/*/last.pt"  # one folder per configuration (a hash of its knobs)
WEIGHTS = Path("artifacts/models/03-classifier/model.safetensors")


def run_notebook(number: str, output: Path, params: list[str], **popen) -> subprocess.Popen:
    """`mfkit run --profile smoke --only NUMBER` in the background, its kernel on one thread (two such runs share
    the two cores, and a run repeats its numbers only at the same thread count)."""
    command = [sys.executable, "-m", "mfkit.cli", "run", "--profile", "smoke", "--only", number]
    command += ["--output", str(output), *params]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, **popen)


def run_03(output: Path, **popen) -> subprocess.Popen:
    return run_notebook("03", output, PARAMS, **popen)


def kill_when(victim: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL the runner and its kernel as soon as `ready()` holds."""
    deadline = time.monotonic() + 600
    while not ready():
        assert victim.poll() is None, f"the notebook ended before {what}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()


@pytest.mark.notebooks
@pytest.mark.slow
def test_killed_notebook_resumes_to_identical_weights(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    uninterrupted = run_03(straight)  # beside the run that gets killed
    victim = run_03(resumed, start_new_session=True)
    kill_when(victim, lambda: list(resumed.glob(CHECKPOINTS)), "writing its first checkpoint")  # mid-training
    assert not (resumed / WEIGHTS).exists(), "the run finished before it could be killed"
    assert uninterrupted.wait(timeout=600) == 0

    assert run_03(resumed).wait(timeout=600) == 0
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()
    assert not list(resumed.glob(CHECKPOINTS))  # a finished run leaves nothing to resume


SEARCH_PARAMS = ["--param", "GRID={'lr': 3}", "TRIAL_EXAMPLES=64"]  # 3 trials per searcher
STUDIES = "artifacts/14-search/studies.db"


def finished_trials(db: Path) -> dict[str, int]:
    """Completed or pruned trials per study name in an Optuna SQLite file (empty while it does not exist)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=1) as connection:
            rows = connection.execute(
                "SELECT s.study_name, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE t.state IN ('COMPLETE', 'PRUNED') GROUP BY s.study_name"
            ).fetchall()
    except sqlite3.Error:  # created but not yet initialised by optuna
        return {}
    return dict(rows)


@pytest.mark.notebooks
@pytest.mark.slow
def test_killed_search_continues_its_studies(tmp_path: Path, smoke_chain: dict) -> None:
    classifier = "artifacts/models/03-classifier"  # 14 reads 03's settings from its classifier card
    shutil.copytree(smoke_chain["output"] / classifier, tmp_path / classifier)
    db = tmp_path / STUDIES
    victim = run_notebook("14", tmp_path, SEARCH_PARAMS, start_new_session=True)
    kill_when(victim, lambda: sum(finished_trials(db).values()) >= 2, "two trials were stored")
    before = finished_trials(db)
    assert 2 <= sum(before.values()) < 9, f"killed too late to test anything: {before}"

    assert run_notebook("14", tmp_path, SEARCH_PARAMS).wait(timeout=900) == 0
    after = finished_trials(db)
    assert sorted(after.values()) == [3, 3, 3], after  # each searcher at its budget, nothing run twice
    printed = (tmp_path / "notebooks" / "14_hyperparameter-search.ipynb").read_text()
    found = [int(n) for n in re.findall(r"(\d+) trial\(s\) found on disk", printed)]
    assert sum(found) == sum(before.values()), (found, before)  # the rerun read every stored trial back
