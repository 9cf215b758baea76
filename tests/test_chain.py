"""The whole notebook chain in the `smoke` profile through papermill, its recorded numbers checked against baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mfkit.cli import main
from mfkit.paths import notebooks_dir

BASELINES = Path(__file__).parent / "baselines" / "smoke.json"


@pytest.fixture
def smoke_run(smoke_chain) -> dict:
    """The session's smoke chain (tests/conftest.py), which other test files share."""
    return smoke_chain


@pytest.mark.notebooks
def test_every_notebook_runs(smoke_run):
    failed = {nb: e["error"] for nb, e in smoke_run["notebooks"].items() if e["status"] != "ok"}
    assert not failed, failed
    assert smoke_run["exit_code"] == 0
    assert len(smoke_run["notebooks"]) == len(list(notebooks_dir().glob("[0-9][0-9]_*.ipynb")))


@pytest.mark.notebooks
def test_every_notebook_has_baselines():
    baselines = json.loads(BASELINES.read_text())
    notebooks = {p.stem for p in notebooks_dir().glob("[0-9][0-9]_*.ipynb")}
    assert notebooks <= set(baselines), f"no baselines for {sorted(notebooks - set(baselines))}"


@pytest.mark.notebooks
def test_recorded_numbers_match_baselines(smoke_run):
    baselines = json.loads(BASELINES.read_text())
    mismatches = []
    for notebook, checks in baselines.items():
        recorded = smoke_run["notebooks"].get(notebook, {}).get("metrics", {})
        for name, check in checks.items():
            if name not in recorded:
                mismatches.append(f"{notebook}.{name}: not recorded")
                continue
            expected = check["value"]
            if isinstance(expected, bool | str):
                ok = recorded[name] == expected
            else:
                ok = recorded[name] == pytest.approx(expected, rel=check.get("rel"), abs=check.get("abs"))
            if not ok:
                mismatches.append(f"{notebook}.{name}: {recorded[name]!r}, baseline {expected!r} ({check})")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.notebooks
def test_a_notebook_that_starts_from_03_names_it_when_run_alone(tmp_path):
    """With an empty artifacts folder, 04 and 05 (side by side, in one run) stop at once and say to run 03 first."""
    code = main(["run", "--profile", "smoke", "--only", "04,05", "--jobs", "2", "--output", str(tmp_path)])
    outcomes = json.loads((tmp_path / "summary.json").read_text())["notebooks"]
    assert code == 1 and set(outcomes) == {"04_multistep-finetuning", "05_peft-lora"}
    for outcome in outcomes.values():
        assert outcome["status"] == "failed"
        assert "03_full-finetuning" in outcome["error"] and "run" in outcome["error"]
