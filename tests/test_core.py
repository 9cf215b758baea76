"""Results ledger, profiles, schedules, parameter groups, model resolution, atomic writes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import mfkit
from mfkit.errors import MfkitError
from mfkit.models import load_model, model_path
from mfkit.optim import lr_multiplier, parameter_groups, warmup_steps_of
from mfkit.paths import atomic_folder, atomic_path, require_artifact
from mfkit.results import (
    RUN_KEY,
    clear_results,
    load_all_results,
    load_results,
    load_run,
    record,
    set_notebook,
)


def test_record_writes_json_and_converts_tensors(tmp_path):
    set_notebook("99_test", tmp_path)
    record("f1", torch.tensor(0.5))
    record("n", 3)
    assert json.loads((tmp_path / "results" / "99_test.json").read_text()) == {"f1": 0.5, "n": 3}
    assert load_all_results(tmp_path) == {"99_test": {"f1": 0.5, "n": 3}}
    clear_results("99_test", tmp_path)
    assert load_results("99_test", tmp_path) == {}


def test_record_refuses_nan_and_objects(tmp_path):
    set_notebook("99_test", tmp_path)
    with pytest.raises(MfkitError, match="NaN"):
        record("x", float("nan"))
    with pytest.raises(MfkitError, match="cannot store"):
        record("x", object())


def test_configure_merges_profile_and_overrides(tmp_path):
    cfg = mfkit.configure(
        "03_full-finetuning", "smoke", artifacts_dir=tmp_path, quiet=True, max_steps=7, lr=None
    )
    smoke = mfkit.profiles.PROFILES["03_full-finetuning"]["smoke"]
    assert (
        cfg.max_steps == 7
        and cfg.lr == smoke["lr"]
        and cfg.profile == "smoke"
        and cfg.artifacts_dir == tmp_path
    )
    with pytest.raises(MfkitError, match="max_step"):
        mfkit.configure("03_full-finetuning", "smoke", artifacts_dir=tmp_path, quiet=True, max_step=7)
    with pytest.raises(MfkitError, match="PROFILE='laptop'"):
        mfkit.configure("03_full-finetuning", "laptop", artifacts_dir=tmp_path, quiet=True)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "half.bin").write_text("half")
        raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    with atomic_folder(target) as staging:
        (staging / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert list(tmp_path.iterdir()) == [target]  # no staging or retired folder left behind
    assert target.stat().st_mode & 0o777 != 0o700  # not the private mode of a temporary folder


def test_require_artifact_names_the_notebook(tmp_path):
    with pytest.raises(MfkitError, match="02_pretraining-tiny-lm"):
        require_artifact(tmp_path / "missing", "02_pretraining-tiny-lm")


def test_schedules():
    assert warmup_steps_of(0.1, 100) == 10 and warmup_steps_of(5, 100) == 5
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(0, 100, 10, "slanted", min_ratio=1 / 32) == pytest.approx(1 / 32)
    assert lr_multiplier(10, 100, 10, "slanted", min_ratio=1 / 32) == pytest.approx(1.0)
    assert lr_multiplier(5, 100, 10, "slanted", min_ratio=1 / 32) == pytest.approx((1 + 0.5 * 31) / 32)
    assert lr_multiplier(100, 100, 10, "slanted", min_ratio=1 / 32) == pytest.approx(1 / 32)
    assert lr_multiplier(50, 100, 10, "constant") == 1.0


def test_parameter_groups_skip_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = parameter_groups(model, weight_decay=0.1, lr=1e-3)
    by_decay = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert by_decay[0.1] == {"0.weight"}
    assert by_decay[0.0] == {"0.bias", "1.weight", "1.bias", "2.bias"}
    layered = parameter_groups(model, 0.0, 1e-3, lr_for=lambda name: 1e-4 if name.startswith("0.") else 1e-3)
    assert {g["lr"] for g in layered} == {1e-4, 1e-3}
    everything = parameter_groups(model, 0.1, 1e-3, include_frozen=True)
    assert "2.weight" in {n for g in everything for n in g["names"]}


def test_parameter_groups_refuse_a_fully_frozen_model():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(MfkitError, match="no trainable"):
        parameter_groups(model, 0.0, 1e-3)


def test_minilm_resolves_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = model_path("minilm")
    assert path.endswith("model")
    model = load_model("minilm", "sequence-classification", num_labels=2)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.classifier.out_features == 2


def test_unknown_model_offline_lists_embedded_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MfkitError) as err:
        load_model("no-such-org/no-such-model")
    assert (
        "minilm" in str(err.value) and "smollm2-135m" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    )


def test_encoder_cannot_be_loaded_for_generation():
    with pytest.raises(MfkitError, match="no next-token head"):
        load_model("minilm", "causal-lm")


def test_tiny_gpt_missing_names_notebook_02(tmp_path):
    with pytest.raises(MfkitError, match="02_pretraining-tiny-lm"):
        model_path("tiny-gpt", tmp_path)


TEST_TABLE = {
    p: {
        "max_steps": 10,
        "lr": 1e-3,
        "train_limit": 100 if p == "smoke" else None,
        "lrs": {"full": 1e-4, "lora": 1e-3},
    }
    for p in mfkit.profiles.PROFILE_NAMES
}


@pytest.fixture
def test_table(monkeypatch):
    """A notebook of our own in the profile table, so these tests do not follow the real notebooks' sizes."""
    monkeypatch.setitem(mfkit.profiles.PROFILES, "99_test", TEST_TABLE)
    return "99_test"


def test_configure_records_what_produced_the_numbers(tmp_path, test_table):
    cfg = mfkit.configure(
        test_table, "smoke", artifacts_dir=tmp_path, quiet=True, seed=3, lrs={"lora": 5e-4}, train_limit="all"
    )
    record("f1", 0.5)
    run = load_run(test_table, tmp_path)
    assert run["profile"] == "smoke" and run["seed"] == 3 and run["overrides"] == ["lrs", "train_limit"]
    assert (
        run["knobs"]["lrs"] == {"full": 1e-4, "lora": 5e-4}
        and run["knobs"]["max_steps"] == cfg.max_steps == 10
    )
    assert run["knobs"]["train_limit"] is None and run["knobs"]["artifacts_dir"] == str(tmp_path)
    assert set(run["versions"]) == {"python", "torch", "transformers", "mfkit"}
    assert load_results(test_table, tmp_path) == {"f1": 0.5}  # readers of numbers never see the run record
    assert load_all_results(tmp_path) == {test_table: {"f1": 0.5}}
    raw = json.loads((tmp_path / "results" / f"{test_table}.json").read_text())
    assert set(raw) == {RUN_KEY, "f1"}
    assert TEST_TABLE["smoke"]["lrs"] == {"full": 1e-4, "lora": 1e-3}  # the table itself is left alone


def test_record_refuses_infinity_and_writes_strict_json(tmp_path):
    set_notebook("99_test", tmp_path)
    with pytest.raises(MfkitError, match="infinity"):
        record("x", [1.0, float("-inf")])
    record("x", [1.0, 2])
    assert json.loads((tmp_path / "results" / "99_test.json").read_text(), parse_constant=pytest.fail) == {
        "x": [1.0, 2]
    }


def test_a_profile_limit_can_be_set_back_to_all(tmp_path, test_table):
    for value in ("all", "ALL", 0):
        cfg = mfkit.configure(test_table, "smoke", artifacts_dir=tmp_path, quiet=True, train_limit=value)
        assert cfg.train_limit is None
    assert mfkit.configure(test_table, "smoke", artifacts_dir=tmp_path, quiet=True).train_limit == 100
    assert (
        mfkit.configure(test_table, "cpu", artifacts_dir=tmp_path, quiet=True, train_limit=5).train_limit == 5
    )


def test_zero_switches_a_regularizer_off_but_not_a_learning_rate():
    knobs = mfkit.profiles.resolve_knobs(
        "10_regularization", "smoke", dropout=0, weight_decay=0.0, l1=0, label_smoothing=0.0
    )
    assert (knobs["dropout"], knobs["weight_decay"], knobs["l1"], knobs["label_smoothing"]) == (
        0,
        0.0,
        0,
        0.0,
    )
    with pytest.raises(MfkitError, match="lr=0"):
        mfkit.profiles.resolve_knobs("10_regularization", "smoke", lr=0)
