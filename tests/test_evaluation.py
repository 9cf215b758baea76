"""mfkit.evaluation: ECE, temperature scaling, threshold choice, bootstrap intervals, error table, loss helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mfkit import evaluation as ev
from mfkit.errors import MfkitError
from mfkit.metrics import softmax
from mfkit.results import ledger_path


def test_ece_matches_a_hand_computed_case():
    # Four examples, two bins of width 0.5 over the top-label confidence:
    # conf 0.9 right, 0.8 wrong -> bin (0.5, 1]: mean conf 0.85, accuracy 0.5, gap 0.35, weight 2/4... plus
    # conf 0.6 right, 0.7 right -> also in (0.5, 1]. So with 2 bins everything falls in the upper bin:
    # mean conf (0.9+0.8+0.6+0.7)/4 = 0.75, accuracy 3/4 -> ECE = 0.
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([1, 1, 1, 1])
    # confidences 0.9, 0.8, 0.6, 0.7; correct: yes, no (pred 0), yes, yes
    assert ev.expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.0)
    # 12 bins: (0.8, 0.9] holds 0.9 (acc 1), (0.7, 0.8] holds 0.8 (acc 0), (0.6, 0.7] holds 0.7 (acc 1),
    # (0.5, 0.6] holds 0.6 (acc 1): ECE = (|1-.9| + |0-.8| + |1-.7| + |1-.6|) / 4 = (0.1+0.8+0.3+0.4)/4 = 0.4
    assert ev.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)
    table = ev.reliability_table(probs, labels, n_bins=10)
    assert table["count"].sum() == 4 and table["count"].iloc[:5].sum() == 0
    assert np.isnan(table["accuracy"].iloc[0])


def test_ece_is_zero_for_perfect_confidence_and_refuses_logits():
    probs = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert ev.expected_calibration_error(probs, [1, 0]) == 0.0
    with pytest.raises(MfkitError, match="softmax"):
        ev.expected_calibration_error(np.array([[2.0, -1.0]]), [0])
    with pytest.raises(MfkitError, match="shape"):
        ev.expected_calibration_error(probs, [1, 0, 1])


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, size=(4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    # A model that is overconfident by a factor 2.5: its logits are the true ones times 2.5.
    fitted = ev.fit_temperature(true_logits * 2.5, labels)
    assert fitted == pytest.approx(2.5, rel=0.1)
    # Scaling by the fitted temperature lowers the ECE and never changes a prediction.
    before = softmax(true_logits * 2.5)
    after = ev.scale_logits(true_logits * 2.5, fitted)
    assert ev.expected_calibration_error(after, labels) < ev.expected_calibration_error(before, labels)
    assert (after.argmax(1) == before.argmax(1)).all()


def test_threshold_is_chosen_on_the_validation_arrays_only():
    rng = np.random.default_rng(1)
    val_labels = rng.integers(0, 2, 300)
    val_scores = np.clip(0.35 * val_labels + rng.uniform(0, 0.65, 300), 0, 1)
    threshold, f1 = ev.choose_threshold(val_labels, val_scores)
    # The rule "score >= threshold" reaches the reported F1 on validation, and no other cut-off does better.
    assert ev.f1_of_positive(val_labels, ev.apply_threshold(val_scores, threshold)) == pytest.approx(f1)
    grid = [ev.f1_of_positive(val_labels, ev.apply_threshold(val_scores, t)) for t in np.unique(val_scores)]
    assert f1 == pytest.approx(max(grid))
    assert ev.f1_of_positive(val_labels, val_scores > 0.5) == pytest.approx(
        f1_score(val_labels, val_scores > 0.5)
    )
    # The signature takes no test data; the same validation arrays give the same threshold whatever else exists,
    # and changing validation labels changes it.
    assert ev.choose_threshold(val_labels.copy(), val_scores.copy()) == (threshold, f1)
    assert ev.choose_threshold(1 - val_labels, val_scores)[0] != threshold
    with pytest.raises(MfkitError, match="single class"):
        ev.choose_threshold(np.ones(5), np.linspace(0, 1, 5))


def test_threshold_for_accuracy_and_a_perfect_separation():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert ev.choose_threshold(labels, scores, "f1") == (0.7, 1.0)
    assert ev.choose_threshold(labels, scores, "accuracy") == (0.7, 1.0)
    with pytest.raises(MfkitError, match="'f1'"):
        ev.choose_threshold(labels, scores, "auc")


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(y == p))


def test_paired_bootstrap_contains_the_true_difference_and_repeats_under_a_seed():
    rng = np.random.default_rng(2)
    n = 1500
    labels = rng.integers(0, 2, n)
    right_a = rng.random(n) < 0.90  # model a is right 90% of the time, b 80%: true accuracy difference 0.10
    right_b = rng.random(n) < 0.80
    preds_a = np.where(right_a, labels, 1 - labels)
    preds_b = np.where(right_b, labels, 1 - labels)
    out = ev.paired_bootstrap(labels, preds_a, preds_b, metric=_accuracy, n_resamples=500, seed=0)
    assert out["low"] <= 0.10 <= out["high"]
    assert out["low"] < out["difference"] < out["high"]
    assert out["share_not_better"] == 0.0
    again = ev.paired_bootstrap(labels, preds_a, preds_b, metric=_accuracy, n_resamples=500, seed=0)
    other = ev.paired_bootstrap(labels, preds_a, preds_b, metric=_accuracy, n_resamples=500, seed=1)
    assert (again["low"], again["high"]) == (out["low"], out["high"])
    np.testing.assert_array_equal(again["draws"], out["draws"])
    assert len(out["draws"]) == 500 and not np.array_equal(other["draws"], out["draws"])


def test_paired_intervals_are_narrower_than_unpaired_ones_when_models_agree():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 800)
    preds_a = np.where(rng.random(800) < 0.85, labels, 1 - labels)
    preds_b = preds_a.copy()
    flip = rng.choice(800, 20, replace=False)
    preds_b[flip] = 1 - preds_b[flip]
    paired = ev.paired_bootstrap(labels, preds_a, preds_b, n_resamples=300, seed=0)
    single_a = ev.bootstrap_ci(labels, preds_a, n_resamples=300, seed=0)
    single_b = ev.bootstrap_ci(labels, preds_b, n_resamples=300, seed=0)
    assert paired["high"] - paired["low"] < (single_a["high"] - single_a["low"]) + (
        single_b["high"] - single_b["low"]
    )
    assert single_a["low"] <= single_a["value"] <= single_a["high"]
    with pytest.raises(MfkitError, match="length"):
        ev.bootstrap_ci(labels, preds_a[:-1])


def test_error_table_lists_the_wrong_rows_with_reasons():
    table = ev.error_table(
        texts=["a b", "c", "d", "e"],
        labels=[1, 0, 1, 0],
        scores=[0.2, 0.95, 0.9, 0.52],
        threshold=0.5,
        tokens=[64, 10, 40, 40],
        max_length=64,
        groups=["spam-1", "hard-ham-1", "spam-2", "easy-ham-1"],
        other_scores=[0.9, 0.1, 0.9, 0.2],
    )
    assert list(table.index) == [1, 0, 3]  # most confidently wrong first
    assert table.loc[1, "reason"] == "far from the threshold; very short; from hard-ham-1; baseline right"
    assert "cut at 64 tokens" in table.loc[0, "reason"]
    assert table.loc[3, "reason"].startswith("near the threshold")


def test_ledger_metrics_names_the_notebook_to_run_when_its_ledger_is_missing(tmp_path):
    path = ledger_path("02_pretraining-tiny-lm", tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test_perplexity": 130.5, "unigram_perplexity": 600.25}))
    specs = [
        {
            "task": "LM",
            "metric": "perplexity",
            "notebook": "02_pretraining-tiny-lm",
            "key": "test_perplexity",
            "baseline_key": "unigram_perplexity",
        },
        {"task": "LM", "metric": "other", "notebook": "02_pretraining-tiny-lm", "key": "missing_key"},
        {
            "task": "spans",
            "metric": "entity F1",
            "notebook": "11_transfer-token-classification",
            "key": "entity_f1",
        },
    ]
    rows = ev.ledger_metrics(specs, tmp_path, digits=1)
    assert rows[0]["value"] == "130.5" and rows[0]["baseline"] == "600.2"
    assert "not recorded" in rows[1]["value"]
    assert rows[2]["value"] == "run notebook 11 first"


def test_save_threshold_writes_json_atomically(tmp_path):
    path = ev.save_threshold(tmp_path / "15-evaluation" / "threshold.json", threshold=0.42, temperature=1.5)
    assert json.loads(path.read_text()) == {"threshold": 0.42, "temperature": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["threshold.json"]
    with pytest.raises(MfkitError, match="threshold"):
        ev.save_threshold(tmp_path / "t.json", temperature=1.0)


def test_choose_variant_keeps_the_best_on_validation_and_breaks_ties_by_order():
    labels = np.array([1, 1, 0, 0])
    preds = {"a": np.array([1, 0, 0, 0]), "b": np.array([1, 1, 0, 0]), "c": np.array([1, 1, 0, 0])}
    chosen, scores = ev.choose_variant(labels, preds)
    assert chosen == "b" and scores["b"] == 1.0 and scores["a"] == pytest.approx(2 / 3)
    assert ev.choose_variant(labels, {"x": preds["a"], "y": preds["a"]})[0] == "x"
    assert ev.SELECTION_HELPERS["choose_variant"] is ev.choose_variant
    with pytest.raises(MfkitError, match="no variants"):
        ev.choose_variant(labels, {})
    with pytest.raises(MfkitError, match="predictions"):
        ev.choose_variant(labels, {"short": np.array([1, 0])})


def _hand_made(n_right: int, n: int = 200, positives: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Labels with `positives` spam among `n` mails, and predictions wrong on the last n - n_right mails
    (half from the first spam mails, half from the last ham mails, so both error kinds occur)."""
    labels = np.zeros(n, dtype=np.int64)
    labels[:positives] = 1
    preds = labels.copy()
    k = n - n_right
    wrong = np.r_[np.arange((k + 1) // 2), n - 1 - np.arange(k // 2)]  # spam first, ham last
    preds[wrong] = 1 - preds[wrong]
    return labels, preds


def test_compare_methods_calls_a_clear_gap_above_and_below():
    labels, good = _hand_made(196)  # 4 mistakes
    _, poor = _hand_made(150)  # 50 mistakes
    out = ev.compare_methods(labels, good, poor, n_resamples=400)
    assert out["verdict"] == "above" and out["low"] > 0
    assert out["difference"] == pytest.approx(
        ev.f1_of_positive(labels, good) - ev.f1_of_positive(labels, poor)
    )
    assert out["runs_a"] == out["runs_b"] == 1 and not out["seeds_measured"]
    assert "seed noise not measured" in out["summary"] and out["summary"].endswith(": above")
    back = ev.compare_methods(labels, poor, good, n_resamples=400)
    assert back["verdict"] == "below" and back["high"] < 0
    assert back["difference"] == pytest.approx(-out["difference"])


def test_compare_methods_sees_no_clear_difference_in_a_small_gap():
    labels, a = _hand_made(180)
    b = a.copy()
    # b fixes 3 of a's mistakes and makes 5 new ones: 2 more out of 200, within the test set's noise
    flip = [0, 1, 2, 30, 31, 100, 101, 102]
    b[flip] = 1 - b[flip]
    out = ev.compare_methods(labels, a, b, n_resamples=400)
    assert out["difference"] > 0 and out["low"] < 0 < out["high"]
    assert out["verdict"] == "no clear difference"
    same = ev.compare_methods(labels, a, a, n_resamples=100)
    assert same["difference"] == 0 and same["verdict"] == "no clear difference"
    assert set(ev.VERDICTS) >= {out["verdict"], same["verdict"]}


def test_compare_methods_with_seeds_needs_the_seed_ranges_apart():
    labels, good = _hand_made(194)
    _, mid = _hand_made(186)
    _, poor = _hand_made(150)
    # Seeds of a: 194 and 186 right; seeds of b: 150 and 186 right. The mean gap is large and the test-set
    # interval excludes 0, but b's best seed equals a's worst: the ranges overlap, so no verdict.
    out = ev.compare_methods(labels, np.stack([good, mid]), np.stack([poor, mid]), n_resamples=400)
    assert out["runs_a"] == out["runs_b"] == 2 and out["seeds_measured"] and out["ranges_overlap"]
    assert out["low"] > 0 and out["verdict"] == "no clear difference"
    assert out["a_min"] == pytest.approx(ev.f1_of_positive(labels, mid)) == pytest.approx(out["b_max"])
    mean_a = (ev.f1_of_positive(labels, good) + ev.f1_of_positive(labels, mid)) / 2
    assert out["a"] == pytest.approx(mean_a)
    assert out["difference"] == pytest.approx(out["a"] - out["b"])
    # Seed ranges apart (a: 194, 186; b: 150, 150) and the interval above 0: "above", with the ranges quoted.
    apart = ev.compare_methods(labels, np.stack([good, mid]), np.stack([poor, poor]), n_resamples=400)
    assert not apart["ranges_overlap"] and apart["verdict"] == "above"
    assert f"seeds {apart['a_min']:.3f}-{apart['a_max']:.3f}" in apart["summary"]
    # A method with one run against one with seeds: its single value is its range.
    single = ev.compare_methods(labels, mid, np.stack([poor, mid]), n_resamples=200)
    assert single["runs_a"] == 1 and single["seeds_measured"] and single["verdict"] == "no clear difference"
    with pytest.raises(MfkitError, match="one row per seed"):
        ev.compare_methods(labels, good[:-1], poor)
