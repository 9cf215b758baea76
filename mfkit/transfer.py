"""Token classification and transfer: word labels on word pieces, a two-head tagger, span scoring, genre subsets.

A token classifier gives one label per *word*, but the encoder reads *word pieces*: "Hawksley" becomes
`hawks ##ley`. The labels are aligned so that the first piece of each word carries the word's label and every
other position (the rest of its pieces, `[CLS]`, `[SEP]`, padding) carries -100, which cross-entropy ignores. The
prediction for a word is then read from its first piece, and proper-noun spans are scored as whole spans (a span
counts only when both of its ends and its type are right), as `seqeval` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import DataCollatorForTokenClassification

from .errors import MfkitError, check_positive
from .loaders import make_loader

IGNORE = -100  # the label cross-entropy skips
SPAN_TAGS = ("O", "B-NAME", "I-NAME")
TOKEN_COLUMNS = ("tokens", "pos", "spans", "genre")

# A coarse tag set in the spirit of the universal tags (Petrov et al., 2012), read from the raw Brown tag's prefix.
# The first rule with a matching prefix wins; a tag no rule matches is X.
_COARSE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("PROPN", ("np",)),
    ("NOUN", ("nn", "nr")),  # nr: adverbial nouns (home, today, west, Monday), NOUN in the universal mapping
    ("AUX", ("be", "do", "hv", "md")),
    ("VERB", ("vb",)),
    ("ADJ", ("jj", "od")),
    ("ADV", ("rb", "wrb", "ql", "wql", "abl", "rn", "*")),
    ("PRON", ("pp", "pn", "wp")),
    ("DET", ("at", "dt", "ap", "abn", "abx", "wdt", "ex")),
    ("ADP", ("in",)),
    ("CONJ", ("cc", "cs")),
    ("NUM", ("cd",)),
    ("PRT", ("to", "rp")),
)
PUNCT_CHARS = set(".,:;()'`-!?")
POS_TAGS = (*(name for name, _ in _COARSE_RULES), "PUNCT", "X")
TASKS = {"pos": POS_TAGS, "spans": SPAN_TAGS}


def coarse_tag(raw: str) -> str:
    """A raw Brown tag (`np-tl`, `fw-nn`, `vbd`, `pps+bez`, `,-hl`) as one of `POS_TAGS`.

    Headline/title/cited suffixes are dropped, a contraction takes its first part, foreign words (`fw-`) are X.
    """
    tag = raw.lower().split("+")[0].split("-")[0] or raw.lower()[:1]
    if raw.lower().startswith("fw-") or tag in ("nil", "uh", "fw"):
        return "X"
    if set(tag) <= PUNCT_CHARS:
        return "PUNCT"
    for name, prefixes in _COARSE_RULES:
        if tag.startswith(prefixes):
            return name
    return "X"


def check_columns(dsdict: Mapping[str, Any], columns: Sequence[str] = TOKEN_COLUMNS) -> None:
    """Raise one `MfkitError` naming the missing columns of the first split that lacks some."""
    for split, table in dsdict.items():
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise MfkitError(
                f"The {split!r} split has no column(s) {missing} (it has {table.column_names}).",
                "use mfkit.load_data('brown'), or give your data a `tokens` list per sentence with one tag per "
                "token in `pos` (Brown tags) and `spans` (BIO tags O/B-NAME/I-NAME), and a `genre` column.",
            )


def genre_subset(table: Dataset, genres: Sequence[str], limit: int | None = None, seed: int = 0) -> Dataset:
    """The rows of `table` from `genres`, at most `limit` of them (a seeded random sample, the same on each run)."""
    unknown = sorted(set(genres) - set(table.unique("genre")))
    if unknown:
        raise MfkitError(
            f"Unknown genre(s) {unknown}.", f"pick from {sorted(table.unique('genre'))} (spelled as shown)."
        )
    wanted = set(genres)
    rows = [i for i, g in enumerate(table["genre"]) if g in wanted]
    if limit is not None and limit < len(rows):
        rows = sorted(np.random.default_rng(seed).choice(rows, size=limit, replace=False).tolist())
    return table.select(rows)


# --------------------------------------------------------------------------------------------------------------
# Word labels on word pieces


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """One label per word piece: the word's label on its first piece, -100 on its other pieces and on specials.

    `word_ids` is what a fast tokenizer's `encoding.word_ids()` returns: for each piece the index of the word it
    came from, or None for `[CLS]`, `[SEP]` and padding.
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(IGNORE)
        else:
            if word >= len(word_labels):
                raise MfkitError(
                    f"Piece of word {word}, but only {len(word_labels)} word labels were given.",
                    "give one label per word (tokens and tags of the same length).",
                )
            labels.append(int(word_labels[word]))
        previous = word
    return labels


def encode_tags(table: Dataset) -> dict[str, list[list[int]]]:
    """The label ids of each task for every sentence: coarse POS ids and span ids (see `TASKS`)."""
    check_columns({"data": table}, ("tokens", "pos", "spans"))
    pos_id = {t: i for i, t in enumerate(POS_TAGS)}
    spans = [list(row) for row in table["spans"]]
    if spans and spans[0] and isinstance(spans[0][0], str):
        span_id = {t: i for i, t in enumerate(SPAN_TAGS)}
        spans = [[span_id[t] for t in row] for row in spans]
    return {"pos": [[pos_id[coarse_tag(t)] for t in row] for row in table["pos"]], "spans": spans}


def tokenize_and_align(table: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """Word pieces of every sentence with one aligned label column per task (`labels_pos`, `labels_spans`).

    Sentences longer than `max_length` pieces are cut; their words past the cut get no label (the column `words`
    keeps how many words survived, so the cut is visible).
    """
    check_positive("max_length", max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise MfkitError(
            "Label alignment needs word_ids(), which only fast (Rust) tokenizers provide.",
            "load the tokenizer with use_fast=True (mfkit.load_tokenizer does for the embedded models).",
        )
    tags = encode_tags(table)
    enc = tokenizer(list(table["tokens"]), is_split_into_words=True, truncation=True, max_length=max_length)
    columns: dict[str, list] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        columns["token_type_ids"] = enc["token_type_ids"]
    for task, rows in tags.items():
        columns[f"labels_{task}"] = [align_labels(enc.word_ids(i), row) for i, row in enumerate(rows)]
    columns["words"] = [sum(1 for label in row if label != IGNORE) for row in columns["labels_pos"]]
    columns["genre"] = list(table["genre"]) if "genre" in table.column_names else [""] * len(table)
    return Dataset.from_dict(columns)


@dataclass
class TaggingCollator:
    """Pads a batch with transformers' `DataCollatorForTokenClassification`, for one task or several.

    The first task's labels go in as `labels`, the collator pads them with -100; any further task's labels
    (`labels_<task>`) are padded the same way here, since the library collator pads only one label column.
    """

    tokenizer: Any
    tasks: tuple[str, ...] = ("pos",)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        first, *rest = self.tasks
        keep = ("input_ids", "attention_mask", "token_type_ids")
        plain = [{**{k: r[k] for k in keep if k in r}, "labels": r[f"labels_{first}"]} for r in rows]
        batch = DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE)(plain)
        width = batch["input_ids"].shape[1]
        for task in rest:
            batch[f"labels_{task}"] = torch.tensor(
                [list(r[f"labels_{task}"]) + [IGNORE] * (width - len(r[f"labels_{task}"])) for r in rows]
            )
        return dict(batch)


def tagging_loader(
    data: Dataset, tokenizer: Any, tasks: Sequence[str], batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A loader of padded batches for `tasks` (see `TaggingCollator`), reproducible under `seed`."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise MfkitError(f"Unknown task(s) {unknown or list(tasks)}.", f"use one or both of {sorted(TASKS)}.")
    return make_loader(data, batch_size, TaggingCollator(tokenizer, tuple(tasks)), shuffle=shuffle, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# One shared encoder, one head per task


@dataclass
class TaggerOutput:
    """What `MultiTaskTagger` returns: the summed loss (when labels were given) and each task's logits."""

    loss: torch.Tensor | None
    logits: dict[str, torch.Tensor]


class MultiTaskTagger(nn.Module):
    """An encoder with one linear head per task over its token vectors: h_t -> W_k h_t + b_k for task k.

    The loss is the sum of the tasks' token cross-entropies (ignoring -100). The first task's labels arrive as
    `labels` (from `TaggingCollator`), the others as `labels_<task>`.

    The encoder's pooler (BERT's [CLS] layer, as `AutoModel` loads it) is removed: no loss reads it, and a weight
    without a gradient stops DistributedDataParallel at the second step under `accelerate launch`.
    """

    def __init__(self, encoder: nn.Module, num_labels: Mapping[str, int], dropout: float = 0.1) -> None:
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.tasks = tuple(num_labels)
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, n) for task, n in num_labels.items()})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **task_labels: torch.Tensor,
    ) -> TaggerOutput:
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        states = self.dropout(states)
        logits = {task: head(states) for task, head in self.heads.items()}
        given = {self.tasks[0]: labels, **{k.removeprefix("labels_"): v for k, v in task_labels.items()}}
        losses = [
            F.cross_entropy(logits[t].flatten(0, 1), given[t].flatten(), ignore_index=IGNORE)
            for t in self.tasks
            if given.get(t) is not None
        ]
        return TaggerOutput(loss=sum(losses) if losses else None, logits=logits)


def task_logits(
    model: nn.Module, batch: Mapping[str, torch.Tensor], tasks: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Each task's logits for `batch`: a `MultiTaskTagger`'s own, or a one-task token classifier's `logits`."""
    inputs = {k: v for k, v in batch.items() if not k.startswith("labels")}
    out = model(**inputs)
    return out.logits if isinstance(out.logits, dict) else {tasks[0]: out.logits}


# --------------------------------------------------------------------------------------------------------------
# Predictions and scores


@torch.no_grad()
def predict_tags(model: nn.Module, loader: DataLoader, tasks: Sequence[str]) -> dict[str, tuple[list, list]]:
    """Word-level (true, predicted) tag sequences per task: one list of tag names per sentence.

    A word's prediction is the argmax at its first piece, the one position that carries its label.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, tuple[list, list]] = {t: ([], []) for t in tasks}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = task_logits(model, batch, tasks)
        for i, task in enumerate(tasks):
            gold = batch["labels"] if i == 0 else batch[f"labels_{task}"]
            preds = logits[task].argmax(-1)
            names = TASKS[task]
            for g_row, p_row in zip(gold.cpu().numpy(), preds.cpu().numpy(), strict=True):
                keep = g_row != IGNORE
                out[task][0].append([names[j] for j in g_row[keep]])
                out[task][1].append([names[j] for j in p_row[keep]])
    model.train(was_training)
    return out


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The spans (type, first, last) of one BIO sequence, read as conlleval (and seqeval's default) read them.

    A span starts at a B- tag, or at an I- tag that does not continue a span of the same type; it ends where the
    next tag does not continue it.
    """
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind and start is not None
        if start is not None and not continues:
            spans.add((kind, start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, label
    return spans


def span_scores(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 by hand: a predicted span counts only if it matches a true one exactly."""
    if len(true) != len(pred):
        raise MfkitError(
            f"{len(true)} true sentences but {len(pred)} predicted.", "pass one sequence per sentence."
        )
    hits = n_true = n_pred = 0
    for t, p in zip(true, pred, strict=True):
        gold, guess = bio_spans(t), bio_spans(p)
        hits, n_true, n_pred = hits + len(gold & guess), n_true + len(gold), n_pred + len(guess)
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def sentence_counts(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], task: str) -> np.ndarray:
    """One row of counts per sentence, from which a task's score over any set of sentences is a ratio of sums.

    `pos`: (words tagged right, words, 0), so accuracy = sum(col 0) / sum(col 1). `spans`: (spans predicted
    exactly, predicted spans, true spans), so entity F1 = 2 sum(col 0) / (sum(col 1) + sum(col 2)), which is
    2PR / (P + R) written with counts.
    """
    if task not in TASKS:
        raise MfkitError(f"Unknown task {task!r}.", f"pass one of {sorted(TASKS)}.")
    if len(true) != len(pred):
        raise MfkitError(
            f"{len(true)} true sentences but {len(pred)} predicted.", "pass one sequence per sentence."
        )
    rows = []
    for t, p in zip(true, pred, strict=True):
        if task == "pos":
            rows.append((sum(a == b for a, b in zip(t, p, strict=True)), len(t), 0))
        else:
            gold, guess = bio_spans(t), bio_spans(p)
            rows.append((len(gold & guess), len(guess), len(gold)))
    return np.asarray(rows, dtype=float).reshape(-1, 3)


def score_from_counts(counts: np.ndarray, task: str) -> float:
    """POS accuracy or entity F1 of the sentences whose `sentence_counts` rows are `counts`."""
    total = np.asarray(counts).sum(axis=0)
    if task == "pos":
        return float(total[0] / total[1]) if total[1] else 0.0
    return float(2 * total[0] / (total[1] + total[2])) if total[1] + total[2] else 0.0


def compare_taggers(
    predictions_a: Mapping[str, tuple[list, list]],
    predictions_b: Mapping[str, tuple[list, list]],
    task: str,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Tagger a against tagger b on the same test sentences, by `evaluation.compare_methods`.

    `predictions_*` are `predict_tags` outputs on the same sentences; `task` is "pos" (word accuracy) or "spans"
    (entity F1). The bootstrap resamples whole *sentences*, not words: the words of a sentence are not
    independent, and a span never crosses a sentence. Returns `compare_methods`' dict (a, b, difference, interval,
    verdict, summary); a and b equal `tagging_scores`' figures.
    """
    from .evaluation import compare_methods

    (true_a, pred_a), (true_b, pred_b) = predictions_a[task], predictions_b[task]
    if true_a != true_b:
        raise MfkitError(
            "The two taggers were scored on different sentences.",
            "predict both on the same unshuffled loader.",
        )
    counts = np.concatenate([sentence_counts(true_a, pred_a, task), sentence_counts(true_b, pred_b, task)])
    n = len(true_a)

    def metric(_labels: np.ndarray, rows: np.ndarray) -> float:
        return score_from_counts(counts[np.asarray(rows, dtype=int)], task)

    # a's sentences are rows 0..n-1 of `counts` and b's rows n..2n-1: resampling positions keeps them paired
    return compare_methods(np.zeros(n), np.arange(n), np.arange(n) + n, metric, n_resamples, seed=seed)


def tagging_scores(predictions: Mapping[str, tuple[list, list]]) -> dict[str, float]:
    """POS accuracy over words and entity-level P/R/F1 of the name spans (by `seqeval`), for the tasks present."""
    scores: dict[str, float] = {}
    if "pos" in predictions:
        true, pred = predictions["pos"]
        flat_t, flat_p = [t for row in true for t in row], [p for row in pred for p in row]
        scores["pos_accuracy"] = float(np.mean([a == b for a, b in zip(flat_t, flat_p, strict=True)]))
    if "spans" in predictions:
        from seqeval.metrics import f1_score, precision_score, recall_score

        true, pred = predictions["spans"]
        scores["entity_precision"] = float(precision_score(true, pred, zero_division=0))
        scores["entity_recall"] = float(recall_score(true, pred, zero_division=0))
        scores["entity_f1"] = float(f1_score(true, pred, zero_division=0))
    return scores


def scores_by_group(
    predictions: Mapping[str, tuple[list, list]], groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """`tagging_scores` of each group of sentences (e.g. each genre); `groups` names the group of every sentence."""
    counts = {len(true) for true, _ in predictions.values()}
    if counts != {len(groups)}:
        raise MfkitError(
            f"{len(groups)} group names for {sorted(counts)} predicted sentences.",
            "pass one group name per sentence, in the order of the loader (unshuffled).",
        )
    out = {}
    for group in sorted(set(groups)):
        rows = [i for i, g in enumerate(groups) if g == group]
        subset = {
            t: ([true[i] for i in rows], [pred[i] for i in rows]) for t, (true, pred) in predictions.items()
        }
        out[group] = tagging_scores(subset)
    return out
