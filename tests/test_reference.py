"""The reference ledger (`mfkit results --save-reference RUN`) and a run beside it (`--compare reference RUN`),
on small fake run folders: no notebook runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from mfkit import reference
from mfkit.errors import MfkitError

AVX512 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2\n"
BASELINES = {
    "03_full-finetuning": {
        "test_f1": {"value": 0.9, "abs": 0.05},
        "test_loss": {"value": 0.2, "rel": 0.1},
        "label": {"value": "spam"},
    },
    "05_peft-lora": {"lora_r4_f1": {"value": 0.8, "abs": 0.05}},
}


def fake_run(
    root: Path, profile: str, metrics: dict[str, dict], status: str = "ok", knobs: dict | None = None
) -> Path:
    """A run folder as `mfkit run` leaves it: summary.json and artifacts/results/<notebook>.json with `_run`."""
    results = root / "artifacts" / "results"
    results.mkdir(parents=True)
    notebooks = {}
    for stem, found in metrics.items():
        run = {
            "profile": profile,
            "seed": 0,
            "knobs": dict(knobs or {"lr": 1e-4}),
            "versions": {"torch": "2.13.0"},
        }
        (results / f"{stem}.json").write_text(json.dumps({**found, "_run": run}))
        notebooks[stem] = {"status": status, "seconds": 12.0, "metrics": found, "run": run}
    summary = {
        "profile": profile,
        "ok": status == "ok",
        "started": "2025-01-01T00:00:00+00:00",
        "output_dir": str(root),
        "artifacts_dir": str(root / "artifacts"),
        "notebooks": notebooks,
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A reference root and a baselines file of the test's own, in place of the repository's."""
    baselines = tmp_path / "smoke.json"
    baselines.write_text(json.dumps(BASELINES))
    monkeypatch.setattr(reference, "BASELINES", baselines)
    monkeypatch.setattr(reference, "reference_root", lambda: tmp_path / "reference")
    return tmp_path


def test_cpu_info_tells_avx512_from_avx2():
    assert reference.cpu_info(AVX512)["kind"] == "AVX-512"
    assert reference.cpu_info(AVX2) | {"cores": None, "machine": None} == {
        "model": "AMD EPYC 7B13",
        "kind": "AVX2, no AVX-512",
        "cores": None,
        "machine": None,
    }
    assert reference.cpu_info("")["kind"].startswith("unknown")


def test_seed_spreads_are_found_beside_their_metric():
    metrics = {
        "lora_r4_f1": 0.8,
        "lora_r4_f1_spread": 0.06,
        "f1_eda_1": 0.7,
        "spread_eda_1": 0.1,
        "drop_eda_1": 0.2,
        "winner_seed_mean": 0.5,
        "winner_seed_spread": 0.02,
        "icl_f1_k0_yes-no": 0.4,
        "icl_f1_std_k0_yes-no": 0.03,
    }
    assert reference.seed_spread("lora_r4_f1", metrics) == 0.06
    assert reference.seed_spread("f1_eda_1", metrics) == 0.1
    assert reference.seed_spread("winner_seed_mean", metrics) == 0.02
    assert reference.seed_spread("icl_f1_k0_yes-no", metrics) == 0.03
    assert reference.seed_spread("drop_eda_1", metrics) is None  # a difference of two scores, not the score
    assert reference.seed_spread("lora_r4_f1_spread", metrics) is None


def test_save_reference_copies_the_ledgers_and_the_machine(places):
    run = fake_run(
        places / "run", "cpu", {"03_full-finetuning": {"test_f1": 0.91}, "05_peft-lora": {"lora_r4_f1": 0.8}}
    )
    code, out = run_cli("results", "--save-reference", str(run))
    folder = places / "reference" / "cpu"
    assert code == 0 and str(folder) in out
    ledger = json.loads((folder / "results" / "03_full-finetuning.json").read_text())
    assert ledger["test_f1"] == 0.91 and ledger["_run"]["knobs"] == {"lr": 1e-4}
    index = json.loads((folder / "index.json").read_text())
    assert list(index["notebooks"]) == ["03_full-finetuning", "05_peft-lora"]
    assert {"model", "kind", "cores"} <= set(index["notebooks"]["05_peft-lora"]["machine"])
    # a later partial run refreshes its notebooks and keeps the others
    again = fake_run(places / "again", "cpu", {"05_peft-lora": {"lora_r4_f1": 0.82}})
    reference.save_reference(again)
    assert json.loads((folder / "results" / "05_peft-lora.json").read_text())["lora_r4_f1"] == 0.82
    assert (folder / "results" / "03_full-finetuning.json").is_file()


def test_save_reference_refuses_smoke_and_unclean_runs(places):
    smoke = fake_run(places / "smoke", "smoke", {"03_full-finetuning": {"test_f1": 0.9}})
    with pytest.raises(MfkitError, match="smoke baselines|smoke.json"):
        reference.save_reference(smoke)
    failed = fake_run(places / "failed", "cpu", {"03_full-finetuning": {}}, status="failed")
    code, _ = run_cli("results", "--save-reference", str(failed))
    assert code == 2 and not (places / "reference" / "cpu").exists()


def test_compare_with_the_reference_marks_expected_and_unexpected_differences(places):
    ref = {
        "03_full-finetuning": {"test_f1": 0.90, "test_loss": 0.20, "label": "spam", "train_seconds": 30.0},
        "05_peft-lora": {"lora_r4_f1": 0.80, "lora_r4_f1_spread": 0.12},
    }
    reference.save_reference(fake_run(places / "ref", "cpu", ref))
    mine = {
        "03_full-finetuning": {"test_f1": 0.93, "test_loss": 0.30, "label": "spam", "train_seconds": 41.0},
        "05_peft-lora": {"lora_r4_f1": 0.70, "lora_r4_f1_spread": 0.0},
    }
    run = fake_run(places / "mine", "cpu", mine, knobs={"lr": 2e-4})
    code, out = run_cli("results", "--compare", "reference", str(run))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert rows["test_f1"].endswith("±0.05  expected")  # 0.03 within the tolerance between CPU kinds
    assert rows["test_loss"].endswith("UNEXPECTED")  # 50% off, the tolerance is 10%
    assert rows["label"].endswith("same")
    assert rows["train_seconds"].endswith("no known spread")  # a timing: no tolerance, not judged
    assert rows["lora_r4_f1"].endswith("±0.12 seeds  expected")  # 0.1 off: within the reference's seed spread
    assert "knobs that differ" in out and "lr: 0.0001 -> 0.0002" in out
    assert "3 expected, 1 UNEXPECTED, 2 with no known spread" in out  # (the spread itself has no tolerance)


def test_a_smoke_run_is_compared_with_the_smoke_baselines(places):
    recorded = {"test_f1": 0.7, "test_loss": 0.21, "train_seconds": 9.0}
    run = fake_run(places / "smoke", "smoke", {"03_full-finetuning": recorded})
    out = reference.compare_with_reference(run)
    assert "reference: smoke" in out and str(places / "smoke.json") in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert rows["test_f1"].endswith("UNEXPECTED") and rows["test_loss"].endswith("expected")
    assert rows["label"].endswith("only in the reference")
    assert rows["train_seconds"].endswith("not a baseline (machine-dependent)")


def test_a_missing_reference_says_how_to_make_one(places):
    run = fake_run(places / "gpu", "gpu", {"03_full-finetuning": {"test_f1": 0.9}})
    code, _ = run_cli("results", "--compare", "reference", str(run))
    assert code == 2
    with pytest.raises(MfkitError, match="--save-reference runs/gpu"):
        reference.compare_with_reference(run)
    assert run_cli("results", "--compare", "a", "b", "c")[0] == 2
