"""Judging a classifier beyond one number: thresholds, calibration, confidence intervals, errors.

    reliability_table(...), expected_calibration_error(...)  how far confidence is from accuracy, bin by bin
    fit_temperature(...), scale_logits(...)                  temperature scaling: one scalar fitted on validation
    choose_threshold(...), apply_threshold(...)              a decision threshold tuned on validation only
    choose_variant(...)                                      the variant kept, chosen on validation predictions
    selection_helper, SELECTION_HELPERS                      the functions that choose; validation data only
    bootstrap_ci(...), paired_bootstrap(...)                 percentile bootstrap intervals, one model or a difference
    compare_methods(...)                                     the one way to say "better": interval, seeds, verdict
    error_table(...)                                         the test mails a model gets wrong, with reasons
    ledger_metrics(...)                                      other notebooks' headline metrics, or who to run first
    save_threshold(...)                                      the chosen threshold as JSON, written atomically

Probabilities are softmax outputs of shape [n, C]; labels are class ids. Everything is numpy in, numpy out.

**Choosing reads validation data only.** Every function that chooses something (a threshold, a temperature, the
variant kept, the model served) is marked with `@selection_helper` and listed in `SELECTION_HELPERS`. Give it the
validation split's outputs; the test split is scored once, after the choice. `tests/test_selection_split.py` reads
the notebooks' code and fails when a call of one of them names test-split data (or names no validation data).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .errors import MfkitError, check_positive
from .metrics import softmax
from .paths import atomic_path

Metric = Callable[[np.ndarray, np.ndarray], float]

# name -> function, for every kit function that chooses something from a model's outputs (see the module's doc)
SELECTION_HELPERS: dict[str, Callable[..., Any]] = {}


def selection_helper(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `function` as one that chooses (a threshold, a temperature, a variant, a model): it must be given the
    validation split's outputs only. The mark is the registry `SELECTION_HELPERS`, which the notebook check reads;
    the function itself is returned unchanged."""
    SELECTION_HELPERS[function.__name__] = function
    return function


def _check_probs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """probs [n, C] (rows summing to 1) and integer labels [n] in 0..C-1, or an `MfkitError`."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (len(probs),) or len(probs) == 0:
        raise MfkitError(
            f"probabilities of shape {probs.shape} do not match labels of shape {labels.shape}.",
            "pass probabilities as [n, classes] (e.g. Predictions.probs) and one label per row.",
        )
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4) or (probs < 0).any():
        raise MfkitError(
            "the rows of the probabilities are not distributions (negative, or not summing to 1).",
            "pass softmax probabilities, not logits (mfkit.metrics.softmax turns logits into them).",
        )
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise MfkitError(
            f"labels must be class ids 0..{probs.shape[1] - 1}; got values from {labels.min()} to {labels.max()}.",
            "encode the labels as integers that index the probability columns.",
        )
    return probs, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def reliability_table(probs: Any, labels: Any, n_bins: int = 10):
    """Confidence (the top probability) cut into `n_bins` equal-width bins over [0, 1]: per bin the number of
    examples, their mean confidence and their accuracy (NaN where a bin is empty). The rows of a reliability
    diagram; `expected_calibration_error` is their weighted gap."""
    import pandas as pd

    probs, labels = _check_probs(probs, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise MfkitError(f"n_bins={n_bins!r} must be a whole number of at least 1.", "pass e.g. n_bins=10.")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, n_bins) / count
        accuracy = np.bincount(which, correct, n_bins) / count
    return pd.DataFrame(
        {"low": edges[:-1], "high": edges[1:], "count": count, "confidence": mean_conf, "accuracy": accuracy}
    )


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """ECE = sum over bins b of (n_b / n) * |accuracy_b - confidence_b| (Guo et al., 2017), top-label confidence."""
    table = reliability_table(probs, labels, n_bins)
    used = table[table["count"] > 0]
    weights = used["count"] / used["count"].sum()
    return float((weights * (used["accuracy"] - used["confidence"]).abs()).sum())


def scale_logits(logits: Any, temperature: float) -> np.ndarray:
    """Softmax probabilities of `logits / temperature` (T > 1 softens, T < 1 sharpens; the argmax never moves)."""
    check_positive("temperature", temperature)
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


@selection_helper
def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T that minimises the mean negative log-likelihood of softmax(logits / T) on (logits, labels).

    Fit it on validation data, never on the test split. One scalar, so it cannot change which class wins; it only
    rescales confidence. The search runs over log T (bounded, Brent's method), where the NLL is smooth.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (len(logits),) or len(logits) == 0:
        raise MfkitError(
            f"logits of shape {logits.shape} do not match labels of shape {labels.shape}.",
            "pass logits as [n, classes] and one label per row.",
        )
    z = torch.from_numpy(logits)
    y = torch.from_numpy(labels.astype(np.int64))

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    found = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded")
    return float(math.exp(found.x))


# --------------------------------------------------------------------------------------------------------------
# Decision threshold
# --------------------------------------------------------------------------------------------------------------


@selection_helper
def choose_threshold(labels: Any, scores: Any, metric: str = "f1") -> tuple[float, float]:
    """(threshold, value): the cut-off on `scores` (e.g. validation p(spam)) whose rule "positive when score >=
    threshold" maximises `metric` ("f1" of class 1, or "accuracy") on these arrays. Pass validation arrays only:
    the test split must not choose anything. Ties go to the highest threshold (fewer false alarms)."""
    from sklearn.metrics import precision_recall_curve

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1 or len(labels) == 0:
        raise MfkitError(
            f"labels {labels.shape} and scores {scores.shape} must be two equal, non-empty 1-d arrays.",
            "pass one positive-class probability per example, e.g. probs[:, 1].",
        )
    if len(np.unique(labels)) < 2:
        raise MfkitError(
            "the labels hold a single class, so no threshold can be chosen.",
            "tune the threshold on a split with both classes.",
        )
    if metric == "f1":
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    elif metric == "accuracy":
        thresholds = np.unique(scores)
        values = np.array([np.mean((scores >= t) == (labels == 1)) for t in thresholds])
    else:
        raise MfkitError(f"metric={metric!r} is not a valid choice.", "use 'f1' or 'accuracy'.")
    best = np.flatnonzero(values == values.max()).max()  # thresholds increase with the index
    return float(thresholds[best]), float(values[best])


def apply_threshold(scores: Any, threshold: float) -> np.ndarray:
    """Class ids: 1 where `scores >= threshold`, else 0."""
    return (np.asarray(scores) >= threshold).astype(np.int64)


def save_threshold(path: str | Path, **content: Any) -> Path:
    """Write `content` (threshold, model folder, metric, temperature, ...) as JSON, atomically; return the path."""
    if "threshold" not in content:
        raise MfkitError("save_threshold got no threshold.", "pass threshold=<the chosen value>.")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
    return path


# --------------------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------------------------


def f1_of_positive(labels: np.ndarray, preds: np.ndarray) -> float:
    """F1 of class 1, 2 TP / (2 TP + FP + FN) (0 when class 1 is neither present nor predicted). The same number
    as sklearn's `f1_score`, computed directly because a bootstrap calls it thousands of times."""
    labels, preds = np.asarray(labels) == 1, np.asarray(preds) == 1
    tp = np.count_nonzero(labels & preds)
    wrong = np.count_nonzero(labels != preds)
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0


@selection_helper
def choose_variant(
    validation_labels: Any, validation_preds: Mapping[str, Any], metric: Metric = f1_of_positive
) -> tuple[str, dict[str, float]]:
    """(name, scores): the variant whose predictions on the *validation* split score best by `metric` (F1 of
    class 1 by default), and every variant's score. Ties go to the variant listed first. Pass validation
    predictions only: the kept variant's test score is measured once, after this choice, and is then an honest
    estimate; a variant chosen by its test score would carry that choice's luck into the number reported."""
    labels = np.asarray(validation_labels)
    if not validation_preds:
        raise MfkitError("choose_variant got no variants.", "pass {name: validation predictions, ...}.")
    scores = {}
    for name, preds in validation_preds.items():
        preds = np.asarray(preds)
        if preds.shape != labels.shape or len(labels) == 0:
            raise MfkitError(
                f"{name}: {preds.shape} predictions for {labels.shape} validation labels.",
                "pass one predicted class id per validation example for every variant.",
            )
        scores[name] = float(metric(labels, preds))
    best = max(scores.values())
    return next(name for name, value in scores.items() if value == best), scores


def _bootstrap(samples: tuple, statistic: Callable, n_resamples: int, confidence: float, seed: int):
    from scipy.stats import bootstrap

    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 2:
        raise MfkitError(f"n_resamples={n_resamples!r} is too few.", "pass a whole number, e.g. 1000.")
    if not 0 < confidence < 1:
        raise MfkitError(f"confidence={confidence!r} is not in (0, 1).", "pass e.g. 0.95.")
    lengths = {len(s) for s in samples}
    if len(lengths) != 1 or 0 in lengths:
        raise MfkitError(
            "the arrays to resample differ in length or are empty.", "pass one entry per test example."
        )
    # scipy >= 1.15 takes the generator as `rng`; older versions (pyproject allows 1.10) as `random_state`
    seeding = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"
    return bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        **{seeding: np.random.default_rng(seed)},
    )


def bootstrap_ci(
    labels: Any,
    preds: Any,
    metric: Metric = f1_of_positive,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """`metric` on the data and its percentile bootstrap interval: resample the examples with replacement,
    rescore, take the (1 - confidence)/2 and (1 + confidence)/2 quantiles. Keys: value, low, high."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    result = _bootstrap((labels, preds), metric, n_resamples, confidence, seed)
    ci = result.confidence_interval
    return {"value": metric(labels, preds), "low": float(ci.low), "high": float(ci.high)}


def paired_bootstrap(
    labels: Any,
    preds_a: Any,
    preds_b: Any,
    metric: Metric = f1_of_positive,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """metric(a) - metric(b) on the same examples, with a percentile interval from resampling the examples
    *together* (both models are scored on each resample, so what the two share cancels out). Also the share of
    resamples where a did not beat b (`share_not_better`) and the resampled differences themselves (`draws`).
    Keys: difference, low, high, share_not_better, draws.

    `preds_a` and `preds_b` are one run's predictions [n], or several runs' [runs, n] (one row per seed, all on
    the same examples): the difference is then that of the mean metric over each side's runs, and every resample
    draws the same examples for every run of both sides."""
    labels = np.asarray(labels)
    runs_a, runs_b = _runs(preds_a, len(labels), "preds_a"), _runs(preds_b, len(labels), "preds_b")
    k = len(runs_a)

    def difference(y: np.ndarray, *runs: np.ndarray) -> float:
        return float(np.mean([metric(y, r) for r in runs[:k]]) - np.mean([metric(y, r) for r in runs[k:]]))

    result = _bootstrap((labels, *runs_a, *runs_b), difference, n_resamples, confidence, seed)
    ci = result.confidence_interval
    return {
        "difference": difference(labels, *runs_a, *runs_b),
        "low": float(ci.low),
        "high": float(ci.high),
        "share_not_better": float(np.mean(result.bootstrap_distribution <= 0)),
        "draws": np.asarray(result.bootstrap_distribution),
    }


def _runs(preds: Any, n: int, name: str) -> list[np.ndarray]:
    """One array of n predictions per run, from [n] (one run) or [runs, n] (one row per seed)."""
    preds = np.asarray(preds)
    runs = [preds] if preds.ndim == 1 else list(preds) if preds.ndim == 2 else []
    if not runs or any(len(r) != n for r in runs) or n == 0:
        raise MfkitError(
            f"{name} has shape {preds.shape}, for {n} labels.",
            "pass one run's predictions [n], or one row per seed [runs, n], all on the same examples.",
        )
    return runs


# The words a comparison may end with: a above b, a below b, or neither.
VERDICTS = ("above", "below", "no clear difference")


def compare_methods(
    labels: Any,
    preds_a: Any,
    preds_b: Any,
    metric: Metric = f1_of_positive,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Is method a above, below, or not clearly different from method b? The one rule the notebooks use.

    `preds_a`, `preds_b`: test predictions of one run [n] or of several seeds [runs, n], on the same test
    examples (`labels`). Two sources of noise are looked at:

    - the test set: `paired_bootstrap`'s interval of the difference of the mean metric, resampling the same test
      rows for every run of both methods (`low`, `high`);
    - the seeds, where a method has more than one run: each run's metric on the whole test set, its lowest and
      highest (`a_min`, `a_max`, `b_min`, `b_max`).

    The verdict is "above" (or "below") only when the interval excludes 0 *and* the two seed ranges do not
    overlap (a single run's range is its one value); anything else is "no clear difference". Keys: a, b
    (the mean metric of each), difference, low, high, confidence, runs_a, runs_b, a_min, a_max, b_min, b_max,
    ranges_overlap, seeds_measured (False when both methods ran once: then only the test set's noise is
    counted), verdict, summary (a short sentence with the numbers)."""
    labels = np.asarray(labels)
    runs_a, runs_b = _runs(preds_a, len(labels), "preds_a"), _runs(preds_b, len(labels), "preds_b")
    paired = paired_bootstrap(
        labels, np.stack(runs_a), np.stack(runs_b), metric, n_resamples, confidence, seed
    )
    scores_a = [float(metric(labels, r)) for r in runs_a]
    scores_b = [float(metric(labels, r)) for r in runs_b]
    overlap = min(scores_a) <= max(scores_b) and min(scores_b) <= max(scores_a)
    if paired["low"] > 0 and not overlap:
        verdict = "above"
    elif paired["high"] < 0 and not overlap:
        verdict = "below"
    else:
        verdict = "no clear difference"
    seeds_measured = len(runs_a) > 1 or len(runs_b) > 1
    summary = (
        f"{paired['difference']:+.3f} ({confidence:.0%} interval {paired['low']:+.3f} to {paired['high']:+.3f}"
        + (
            f"; seeds {min(scores_a):.3f}-{max(scores_a):.3f} against {min(scores_b):.3f}-{max(scores_b):.3f}"
            if seeds_measured
            else "; one run each, seed noise not measured"
        )
        + f"): {verdict}"
    )
    return {
        "a": float(np.mean(scores_a)),
        "b": float(np.mean(scores_b)),
        "difference": paired["difference"],
        "low": paired["low"],
        "high": paired["high"],
        "confidence": confidence,
        "runs_a": len(runs_a),
        "runs_b": len(runs_b),
        "a_min": min(scores_a),
        "a_max": max(scores_a),
        "b_min": min(scores_b),
        "b_max": max(scores_b),
        "ranges_overlap": overlap,
        "seeds_measured": seeds_measured,
        "verdict": verdict,
        "summary": summary,
    }


# --------------------------------------------------------------------------------------------------------------
# Error analysis and the other notebooks' metrics
# --------------------------------------------------------------------------------------------------------------


def error_reasons(
    label: int,
    score: float,
    threshold: float,
    tokens: int,
    max_length: int,
    group: str | None = None,
    other_score: float | None = None,
    margin: float = 0.1,
    short: int = 32,
) -> str:
    """A short, data-derived note on why one mail may have been misclassified (not a diagnosis): within `margin`
    of the threshold or far from it, cut at `max_length` or under `short` tokens, from a "hard" source group,
    and whether the other model's score (at 0.5) was right."""
    reasons = []
    if abs(score - threshold) < margin:
        reasons.append("near the threshold")
    elif (score >= threshold) != bool(label):
        reasons.append("far from the threshold")
    if tokens >= max_length:
        reasons.append(f"cut at {max_length} tokens")
    elif tokens < short:
        reasons.append("very short")
    if group and group.startswith("hard"):
        reasons.append(f"from {group}")
    if other_score is not None:
        reasons.append("baseline right" if (other_score >= 0.5) == bool(label) else "baseline wrong too")
    return "; ".join(reasons)


def error_table(
    texts: Sequence[str],
    labels: Any,
    scores: Any,
    threshold: float,
    tokens: Sequence[int],
    max_length: int,
    groups: Sequence[str] | None = None,
    other_scores: Any = None,
    names: Sequence[str] = ("ham", "spam"),
    width: int = 90,
):
    """The examples where `scores >= threshold` disagrees with `labels`, most confidently wrong first: true class,
    p(positive), the baseline's p(positive), length in tokens, source group, a reason column, and the text's start."""
    import pandas as pd

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    wrong = np.flatnonzero(apply_threshold(scores, threshold) != labels)
    wrong = wrong[np.argsort(-np.abs(scores[wrong] - threshold), kind="stable")]
    other = None if other_scores is None else np.asarray(other_scores, dtype=np.float64)
    rows = []
    for i in wrong:
        group = groups[i] if groups is not None else None
        rows.append(
            {
                "true": names[int(labels[i])],
                "p(spam)": scores[i],
                "baseline p(spam)": np.nan if other is None else other[i],
                "tokens": int(tokens[i]),
                "group": group,
                "reason": error_reasons(
                    int(labels[i]),
                    float(scores[i]),
                    threshold,
                    int(tokens[i]),
                    max_length,
                    group,
                    None if other is None else float(other[i]),
                ),
                "start of the mail": " ".join(str(texts[i]).split())[:width],
            }
        )
    return pd.DataFrame(rows, index=pd.Index(wrong, name="test row"))


def ledger_metrics(
    specs: Sequence[Mapping[str, str]], artifacts: str | Path | None = None, digits: int = 3
) -> list[dict[str, str]]:
    """Rows of "which metric for which task": each spec names a `task`, a `metric`, the `notebook` that recorded
    it and its recorded `key` (and optionally a `baseline_key`). The value comes from that notebook's ledger;
    when the ledger is missing, the row says which notebook to run first instead of leaving the row out."""
    from .results import load_results

    rows = []
    for spec in specs:
        found = load_results(spec["notebook"], artifacts)
        number = spec["notebook"][:2]
        if not found:
            value = baseline = f"run notebook {number} first"
        else:
            value = _formatted(found, spec["key"], number, digits)
            baseline = (
                _formatted(found, spec["baseline_key"], number, digits) if spec.get("baseline_key") else ""
            )
        rows.append(
            {
                "task": spec["task"],
                "metric": spec["metric"],
                "value": value,
                "baseline": baseline,
                "from": spec["notebook"],
            }
        )
    return rows


def _formatted(found: Mapping[str, Any], key: str, number: str, digits: int) -> str:
    value = found.get(key)
    if value is None:
        return f"not recorded by notebook {number} ({key})"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
