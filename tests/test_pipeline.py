"""The chain's waterfall read from ledgers, the choice rule, and the export (serving rule, card, ONNX check)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mfkit import pipeline, serve
from mfkit.errors import MfkitError
from mfkit.predict import SERVING_CONFIG, Predictor
from mfkit.results import ledger_path


def write_ledger(artifacts, notebook, values):
    path = ledger_path(notebook, artifacts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


def test_the_waterfall_reads_each_step_and_names_what_did_not_run(tmp_path):
    write_ledger(
        tmp_path, "03_full-finetuning", {"baseline_f1": 0.9, "test_f1": 0.95, "train_seconds": 100.0}
    )
    write_ledger(tmp_path, "04_multistep-finetuning", {"ulmfit_seconds": 80.0})
    table = pipeline.waterfall(tmp_path)
    assert table.loc["full fine-tuning", "test F1"] == 0.95
    assert table.loc["TF-IDF + logistic regression", "F1 - full"] == pytest.approx(-0.05)
    assert table.loc["multi-step (ULMFiT)", "status"] == "04_multistep-finetuning recorded no 'ulmfit_f1'"
    assert table.loc["LoRA (best rank)", "status"] == "not run: run notebook 05_peft-lora first"
    assert table.loc["full fine-tuning", "status"] == "ok"


def test_the_generation_waterfall_compares_only_rows_scored_on_the_same_verses(tmp_path):
    write_ledger(
        tmp_path,
        "06_instruction-tuning",
        {"copy_chrf": 41.0, "zero_shot_chrf": 9.0, "lora_chrf": 40.0, "lora_chrf_to_input": 60.0},
    )
    write_ledger(
        tmp_path,
        "07_preference-alignment",
        {
            "start_chrf": 38.0,
            "sft_chrf": 39.0,
            "dpo_chrf": 42.5,
            "dpo_archaic_rate": 0.01,
            "dpo_reward_accuracy": 0.8,
        },
    )
    table = pipeline.generation_waterfall(tmp_path)
    assert table.loc["DPO", "chrF - start"] == pytest.approx(4.5)
    assert table.loc["SFT, more steps", "chrF - start"] == pytest.approx(1.0)
    assert np.isnan(table.loc["LoRA SFT", "chrF - start"])  # 06's verses are not 07's: no difference taken
    assert table.loc["LoRA SFT", "chrF to input"] == 60.0
    assert (table.loc["DPO", "archaic share"], table.loc["DPO", "reward accuracy"]) == (0.01, 0.8)
    assert table.loc["ORPO", "status"] == "07_preference-alignment recorded no 'orpo_chrf'"
    assert table.loc["DPO", "model folder"] == "07-smollm2-verse-dpo"


def test_choose_takes_the_fastest_model_within_the_tolerance_on_validation(tmp_path):
    # the test F1s say "fast but bad" is bad; the choice must not read them, only the validation predictions
    write_ledger(tmp_path, "03_full-finetuning", {"baseline_f1": 0.5, "test_f1": 0.95})
    steps = (
        pipeline.Step("full", "03_full-finetuning", "test_f1", folder="03-classifier"),
        pipeline.Step("fast but bad", "03_full-finetuning", "baseline_f1", folder="x"),
    )
    table = pipeline.waterfall(tmp_path, steps)
    table["latency ms"] = [10.0, 1.0]
    assert table["servable"].all()
    labels = np.array([1] * 10 + [0] * 10)
    full = labels.copy()
    fast = labels.copy()
    fast[0] = 0  # one spam missed on validation: F1 1.0 -> 0.947
    preds = {"full": full, "fast but bad": fast}
    assert pipeline.choose(table, 0.01, validation_labels=labels, validation_preds=preds) == "full"
    assert pipeline.choose(table, 0.06, validation_labels=labels, validation_preds=preds) == "fast but bad"
    with pytest.raises(TypeError):
        pipeline.choose(table, 0.06)  # no validation predictions: no choice
    with pytest.raises(MfkitError, match="full fine-tuning"):
        pipeline.choose(table, 0.06, validation_labels=labels, validation_preds={"fast but bad": fast})
    table["latency ms"] = np.nan
    with pytest.raises(MfkitError, match="within tolerance"):
        pipeline.choose(table, validation_labels=labels, validation_preds=preds)


def test_the_export_carries_the_rule_and_the_card_and_onnx_matches(tiny_classifier_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    serving = {"threshold": 0.7, "temperature": 1.5, "max_length": 32, "positive": 1}
    card = pipeline.model_card("test model", {"dataset": "spam"}, {"test_f1": 0.5}, serving, "none known")
    target, difference = pipeline.export_model(
        tiny_classifier_dir, tmp_path / "export", serving, card, ["hello", "win now"]
    )
    assert json.loads((target / SERVING_CONFIG).read_text()) == serving
    assert "## Limits" in (target / "README.md").read_text() and "test_f1: 0.5000" in card
    assert (target / "model.onnx").is_file() and difference < 1e-4
    predictor = Predictor.load(target)
    assert (predictor.threshold, predictor.temperature, predictor.max_length) == (0.7, 1.5, 32)
    with pytest.raises(MfkitError, match="not a saved classifier"):
        pipeline.export_model(tmp_path, tmp_path / "again", serving, card)
    assert not (tmp_path / "again").exists()


def test_the_serving_rule_is_12s_only_for_the_model_12_tuned(tiny_classifier_dir, tmp_path):
    from mfkit.evaluation import save_threshold

    texts = ["hello there", "win money now", "meeting at noon", "free prize", "lunch?", "cheap pills"] * 4
    labels = [0, 1, 0, 1, 0, 1] * 4
    rule_file = save_threshold(
        tmp_path / "threshold.json", threshold=0.8, temperature=2.0, model_folder="x/other"
    )
    fitted, why = pipeline.serving_rule(tiny_classifier_dir, rule_file, texts, labels, max_length=16)
    assert "fitted here" in why and "other" in why and fitted["threshold"] != 0.8
    assert 0.0 <= fitted["threshold"] <= 1.0 and fitted["temperature"] > 0
    missing, why = pipeline.serving_rule(tiny_classifier_dir, tmp_path / "none.json", texts, labels, 16)
    assert missing == fitted and "has not run" in why
    save_threshold(rule_file, threshold=0.8, temperature=2.0, model_folder=f"a/{tiny_classifier_dir.name}")
    reused, why = pipeline.serving_rule(tiny_classifier_dir, rule_file, texts, labels, max_length=16)
    assert reused == {"threshold": 0.8, "temperature": 2.0} and "notebook 15" in why


def test_a_server_that_cannot_start_says_why(tmp_path):
    with pytest.raises(MfkitError, match="stopped before listening"), serve.running_server(tmp_path):
        pass


def test_notebook_20_runs_after_every_notebook_its_tables_read():
    """With `mfkit run --jobs 2`, 20 must not start while a notebook whose results its waterfalls read still
    runs (a smoke chain once exported without 18's rows); `after` orders it without making them required."""
    import nbformat

    from mfkit.paths import notebooks_dir

    meta = nbformat.read(notebooks_dir() / "20_pipeline-serving.ipynb", as_version=4).metadata["mfkit"]
    read = {step.notebook for step in (*pipeline.STEPS, *pipeline.GENERATION_STEPS)} | {"15_evaluation"}
    assert read <= {*meta["requires"], *meta["after"]}
