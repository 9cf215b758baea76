"""Text classification plumbing shared by every notebook that fine-tunes, adapts or compresses a classifier.

The path from a `DatasetDict` of texts and labels to numbers worth reporting:

    limit_rows(...)                   optional, deterministic, label-stratified subsets (small runs)
    tokenize_for_classification(...)  token ids truncated to `max_length`, no padding; `label` -> `labels`
    classification_loaders(...)       train (shuffled) / validation / test loaders with dynamic padding
    evaluate_classifier(...)          loss, accuracy, precision/recall/F1 of the positive class, macro F1
    confusion(...), tfidf_baseline(...)  the error table and the classical baseline to beat
    save_classifier(...)              the fine-tuned model + tokenizer as one folder, written atomically

`evaluate_classifier` has the signature `fit(..., eval_fn=...)` expects, and its keys carry the `eval_` prefix,
so `TrainConfig(monitor="eval_f1", mode="max")` early-stops on validation F1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .errors import MfkitError, check_positive
from .loaders import make_loader, pad_collate
from .metrics import classification_scores, predict_logits, softmax
from .paths import atomic_folder, require_artifact

SPLITS = ("train", "validation", "test")
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")

Limits = int | Mapping[str, int | None] | None


class Loaders(NamedTuple):
    """The three loaders of a classification run (unpacks as `train, validation, test = loaders`)."""

    train: DataLoader
    validation: DataLoader
    test: DataLoader


@dataclass
class Predictions:
    """A classifier's outputs on one loader: logits [n, C], probabilities (softmax of the logits), labels."""

    logits: np.ndarray
    probs: np.ndarray
    labels: np.ndarray

    @property
    def preds(self) -> np.ndarray:
        """The predicted class of each example: the largest logit (equivalently, the largest probability)."""
        return self.logits.argmax(axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Data: checks, limits, tokenization, loaders
# --------------------------------------------------------------------------------------------------------------


def _check_splits(dsdict: Mapping[str, Any], needed: Sequence[str] = SPLITS) -> None:
    missing = [name for name in needed if name not in dsdict]
    if missing:
        raise MfkitError(
            f"The data has no {missing} split(s); it has {list(dsdict)}.",
            "load it with mfkit.data.load_data, which always returns train/validation/test.",
        )


def _check_columns(dsdict: Mapping[str, Any], text_column: str | None, label_column: str) -> None:
    """Raise `MfkitError` naming the real columns when a text or label column is missing in any split."""
    for split, table in dsdict.items():
        columns = table.column_names
        for role, column in (("text", text_column), ("label", label_column)):
            if column is not None and column not in columns:
                raise MfkitError(
                    f"The {role} column {column!r} is not in the {split!r} split; its columns are {columns}.",
                    f"pass {role}_column= with one of {columns}.",
                )


def _label_array(table: Any, label_column: str, split: str) -> np.ndarray:
    """The labels of one split as non-negative integers, or an `MfkitError` saying how to get there."""
    values = table[label_column]
    if any(v is None or isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0 for v in values):
        raise MfkitError(
            f"The {label_column!r} column of the {split!r} split holds values that are not class ids 0..C-1.",
            "encode the labels as a ClassLabel (load_data does this for text labels) or map them to integers.",
        )
    return np.asarray(values, dtype=np.int64)


def stratified_take(labels: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Row indices of a subset of `n` rows whose class shares follow `labels` (largest remainders).

    Every class present keeps at least one row when `n` allows, so a small subset never loses the rare class.
    Rows within a class are drawn by a generator seeded with `seed`: the same call gives the same rows. The
    indices come back in increasing order (the subset keeps the data's own order).
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return list(range(len(labels)))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * n / len(labels)
    take = np.floor(quotas).astype(int)
    for i in np.argsort(-(quotas - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    if n >= len(classes):
        for i in np.flatnonzero(take == 0):  # lend one row to each empty class from the largest
            take[np.argmax(take)] -= 1
            take[i] = 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cls, k in zip(classes, take, strict=True):
        rows = np.flatnonzero(labels == cls)
        chosen.extend(rng.permutation(rows)[:k].tolist())
    return sorted(chosen)


def _split_limits(limits: Limits, splits: Sequence[str]) -> dict[str, int | None]:
    if limits is None:
        return {}
    if isinstance(limits, Mapping):
        unknown = sorted(set(limits) - set(splits))
        if unknown:
            raise MfkitError(
                f"limits names unknown split(s) {unknown}.", f"use split names from {list(splits)}."
            )
        chosen = dict(limits)
    else:
        chosen = dict.fromkeys(splits, limits)
    for split, value in chosen.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise MfkitError(
                f"The row limit for {split!r} is {value!r}.", "use a positive whole number or None."
            )
    return chosen


def limit_rows(dsdict: Mapping[str, Any], limits: Limits, label_column: str = "label", seed: int = 0) -> Any:
    """At most `limits[split]` rows of each split (an int applies to every split; None keeps all).

    The subset is stratified by `label_column` (see `stratified_take`), so both classes survive a small limit,
    and deterministic: the same data and `seed` always give the same rows.
    """
    from datasets import DatasetDict

    chosen = _split_limits(limits, list(dsdict))
    if not chosen:
        return dsdict
    _check_columns(dsdict, None, label_column)
    out = {}
    for split, table in dsdict.items():
        n = chosen.get(split)
        if n is None or n >= len(table):
            out[split] = table
        else:
            out[split] = table.select(stratified_take(_label_array(table, label_column, split), n, seed))
    return DatasetDict(out)


def tokenize_for_classification(
    dsdict: Mapping[str, Any],
    tokenizer: Any,
    max_length: int,
    text_column: str = "text",
    label_column: str = "label",
    limits: Limits = None,
) -> Any:
    """Token ids for a sequence classifier: truncated to `max_length` tokens, not padded.

    Each split keeps only what the model takes (`input_ids`, `attention_mask`, `token_type_ids` where the
    tokenizer makes them) and `labels` (the renamed `label_column`), in the input order. Padding is left to the
    loader (`mfkit.loaders.pad_collate`), which pads each batch only to its own longest row. `limits` first takes
    a stratified, deterministic subset of each split (see `limit_rows`).
    """
    from datasets import DatasetDict

    check_positive("max_length", max_length)
    _check_columns(dsdict, text_column, label_column)
    dsdict = limit_rows(dsdict, limits, label_column)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        out = {k: encoded[k] for k in MODEL_COLUMNS if k in encoded}
        out["labels"] = batch[label_column]
        return out

    out = {}
    for split, table in dsdict.items():
        _label_array(table, label_column, split)
        out[split] = table.map(
            encode,
            batched=True,
            remove_columns=table.column_names,
            keep_in_memory=True,
            desc=f"tokenize {split}",
        )
    return DatasetDict(out)


def texts_seen(tokenized: Mapping[str, Any], tokenizer: Any) -> Any:
    """Each split of `tokenize_for_classification`'s output as text again: what the model reads of each mail.

    The kept token ids are decoded without the markers the tokenizer adds ([CLS], [SEP], padding) but with its
    unknown-token symbol, which the model reads too; a classical model fitted on these texts sees the same
    truncated view of every mail as the fine-tuned model (columns `text` and `label`).
    """
    from datasets import Dataset, DatasetDict

    markers = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}

    def decode(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i not in markers])

    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": [decode(ids) for ids in table["input_ids"]], "label": list(table["labels"])}
            )
            for split, table in tokenized.items()
        }
    )


def classification_loaders(
    tokenized: Mapping[str, Any],
    tokenizer: Any,
    batch_size: int,
    seed: int = 0,
    eval_batch_size: int | None = None,
    group_by_length: bool = False,
) -> Loaders:
    """Train (shuffled, reproducible order), validation and test (in order) loaders with dynamic padding.

    Evaluation needs no gradients, so `eval_batch_size` defaults to twice `batch_size`. `group_by_length=True`
    batches training mails of similar length (less padding where lengths vary; see `loaders.make_loader`); the
    evaluation loaders keep their order.
    """
    _check_splits(tokenized)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise MfkitError(
            "The tokenizer has no padding token, so batches of different lengths cannot be padded.",
            "give it one first, e.g. tokenizer.pad_token = tokenizer.eos_token (and set model.config.pad_token_id).",
        )
    collate = pad_collate(pad_id)
    eval_size = eval_batch_size or 2 * batch_size
    return Loaders(
        train=make_loader(
            tokenized["train"], batch_size, collate, shuffle=True, seed=seed, group_by_length=group_by_length
        ),
        validation=make_loader(tokenized["validation"], eval_size, collate, shuffle=False, seed=seed),
        test=make_loader(tokenized["test"], eval_size, collate, shuffle=False, seed=seed),
    )


def label_maps(names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) for a model config, from the class names in id order."""
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def predict(model: nn.Module, loader: DataLoader) -> Predictions:
    """Logits, softmax probabilities and labels of `model` over `loader` (eval mode, no gradients)."""
    logits, labels = predict_logits(model, loader)
    return Predictions(logits=logits, probs=softmax(logits), labels=labels)


def scores_of(predictions: Predictions, positive: int = 1, prefix: str = "") -> dict[str, float]:
    """Mean cross-entropy plus `classification_scores` of some predictions, keys prefixed with `prefix`."""
    # Cross-entropy from the logits (log-softmax is stable where log(softmax) would underflow).
    loss = F.cross_entropy(torch.from_numpy(predictions.logits), torch.from_numpy(predictions.labels).long())
    scores = {"loss": float(loss)}
    scores.update(classification_scores(predictions.labels, predictions.preds, positive=positive))
    return {f"{prefix}{k}": v for k, v in scores.items()}


def evaluate_classifier(
    model: nn.Module, loader: DataLoader, positive: int = 1, prefix: str = "eval_"
) -> dict[str, float]:
    """Loss, accuracy, precision, recall and F1 of class `positive`, and macro F1 of `model` on `loader`.

    Keys carry `prefix` (`eval_loss`, `eval_f1`, ...), so this is a drop-in `fit(..., eval_fn=evaluate_classifier)`.
    """
    return scores_of(predict(model, loader), positive=positive, prefix=prefix)


def confusion(labels: Sequence[int], preds: Sequence[int], num_labels: int | None = None) -> np.ndarray:
    """The confusion matrix: entry [i, j] counts examples of true class i predicted as class j."""
    from sklearn.metrics import confusion_matrix

    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.shape != preds.shape or labels.size == 0:
        raise MfkitError(
            f"labels {labels.shape} and predictions {preds.shape} differ or are empty.",
            "pass one prediction per label.",
        )
    n = num_labels or int(max(labels.max(), preds.max())) + 1
    return confusion_matrix(labels, preds, labels=list(range(n)))


def split_limits(settings: Mapping[str, Any]) -> dict[str, int | None]:
    """Per-split row limits from a notebook's knobs: `train_limit`, `eval_limit` (validation and test) and an
    optional `val_limit`, a smaller validation sample for the evaluations during training."""
    val_limit = settings.get("val_limit")
    return {
        "train": settings.get("train_limit"),
        "validation": val_limit if val_limit is not None else settings.get("eval_limit"),
        "test": settings.get("eval_limit"),
    }


CARD_NAME = "mfkit.json"
BASELINE_NOTEBOOK = "03_full-finetuning"
BASELINE_FOLDER = "03-classifier"


def save_classifier(
    model: nn.Module, tokenizer: Any, target: str | Path, card: Mapping[str, Any] | None = None
) -> Path:
    """Save a fine-tuned classifier and its tokenizer as one `from_pretrained` folder, replacing `target` whole.

    `card` (settings and scores of the run that made it) is written beside the weights as `mfkit.json`, so a later
    notebook knows what it starts from. The folder is written beside `target` first and renamed into place, so an
    interrupted save never leaves a half-written model for a later notebook to load. Under `accelerate launch`,
    call it on every process: the main one's folder is the one put in place (see `paths.atomic_folder`).
    """
    target = Path(target)
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if card is not None:
            (staging / CARD_NAME).write_text(json.dumps(dict(card), indent=2, sort_keys=True, default=str))
    return target


@dataclass(frozen=True)
class Baseline:
    """The shared full-fine-tuning baseline: notebook 03's saved classifier and what produced it."""

    path: Path
    settings: dict[str, Any]
    scores: dict[str, Any]


def load_baseline(artifacts: str | Path) -> Baseline:
    """Notebook 03's classifier folder and card under `artifacts`; stops with a message naming 03 when missing."""
    folder = require_artifact(Path(artifacts) / "models" / BASELINE_FOLDER, BASELINE_NOTEBOOK)
    card = require_artifact(folder / CARD_NAME, BASELINE_NOTEBOOK)
    content = json.loads(card.read_text())
    return Baseline(folder, dict(content["settings"]), dict(content["scores"]))


# --------------------------------------------------------------------------------------------------------------
# The classical baseline
# --------------------------------------------------------------------------------------------------------------


def tfidf_pipeline(
    c: float = 10.0, ngram_range: tuple[int, int] = (1, 1), min_df: int = 2, max_features: int | None = None
):
    """TF-IDF features (sublinear term frequency, word n-grams) into an L2-regularised logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    return Pipeline(
        [
            (
                "tfidf",
                TfidfVectorizer(
                    sublinear_tf=True, ngram_range=ngram_range, min_df=min_df, max_features=max_features
                ),
            ),
            ("logreg", LogisticRegression(C=c, solver="liblinear", max_iter=1000)),
        ]
    )


@dataclass(frozen=True)
class TfidfModel:
    """The fitted baseline: a TF-IDF + logistic regression pipeline, its chosen C, and the seconds fitting took."""

    pipeline: Any
    c: float
    seconds: float

    def predict_proba(self, texts: Sequence[str | None]) -> np.ndarray:
        """Class probabilities [n, C] of `texts` (None counts as an empty text)."""
        return self.pipeline.predict_proba([t or "" for t in texts])


def fit_tfidf(
    dsdict: Mapping[str, Any],
    text_column: str = "text",
    label_column: str = "label",
    positive: int = 1,
    cs: Sequence[float] = (1.0, 10.0, 100.0),
    **pipeline_kw: Any,
) -> TfidfModel:
    """TF-IDF + logistic regression fitted on `train`, its C chosen on `validation` (by F1 of `positive`).

    The vectorizer is fitted once on the training texts; one logistic regression per C is fitted on its features.
    `seconds` is the time of all the fitting, the choice of C included. Keyword arguments go to `tfidf_pipeline`
    (e.g. `min_df=1` for a handful of texts, `ngram_range=(1, 2)` for word pairs).
    """
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    _check_splits(dsdict, ("train", "validation"))
    _check_columns(dsdict, text_column, label_column)
    texts = {name: [t or "" for t in dsdict[name][text_column]] for name in ("train", "validation")}
    labels = {name: _label_array(dsdict[name], label_column, name) for name in texts}
    if len(np.unique(labels["train"])) < 2:
        raise MfkitError(
            "The train split holds a single class.", "give the baseline examples of at least two classes."
        )
    if not cs:
        raise MfkitError(
            "tfidf_baseline got no values of C to try.",
            "pass cs= with at least one number, e.g. (1.0, 10.0).",
        )
    start = time.perf_counter()
    pipeline = tfidf_pipeline(**pipeline_kw)
    features = {"train": pipeline["tfidf"].fit_transform(texts["train"])}
    features["validation"] = pipeline["tfidf"].transform(texts["validation"])
    best: tuple[float, float, Any] | None = None
    for c in cs:
        logreg = clone(pipeline["logreg"]).set_params(C=c).fit(features["train"], labels["train"])
        f1 = classification_scores(labels["validation"], logreg.predict(features["validation"]), positive)[
            "f1"
        ]
        if best is None or f1 > best[0]:
            best = (f1, c, logreg)
    seconds = time.perf_counter() - start
    _, c, logreg = best
    fitted = Pipeline([("tfidf", pipeline["tfidf"]), ("logreg", logreg)])
    return TfidfModel(fitted, float(c), seconds)


def tfidf_baseline(
    dsdict: Mapping[str, Any],
    text_column: str = "text",
    label_column: str = "label",
    positive: int = 1,
    cs: Sequence[float] = (1.0, 10.0, 100.0),
    split: str = "test",
    **pipeline_kw: Any,
) -> dict[str, float]:
    """TF-IDF + logistic regression: fit on `train`, pick C on `validation` (by F1), score on `split`.

    Returns the scores of `classification_scores` on `split`, the chosen `c`, and the time of all the fitting,
    the choice of C included, in `seconds` (see `fit_tfidf`, which returns the fitted model itself).
    """
    _check_splits(dsdict, ("train", "validation", split))
    _check_columns(dsdict, text_column, label_column)
    labels = _label_array(dsdict[split], label_column, split)
    model = fit_tfidf(dsdict, text_column, label_column, positive, cs, **pipeline_kw)
    preds = model.pipeline.predict([t or "" for t in dsdict[split][text_column]])
    return {**classification_scores(labels, preds, positive), "c": model.c, "seconds": model.seconds}
