"""Metrics: classification scores from logits, language-model perplexity, and a unigram baseline."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .errors import MfkitError

# The Accelerator of the `fit` that is running, if any: evaluation helpers called from its `eval_fn` gather
# their per-example results from every process through it (see `gather_rows`).
_ACCELERATOR: ContextVar[Any] = ContextVar("mfkit_accelerator", default=None)


@contextmanager
def gathering_with(accelerator: Any) -> Iterator[None]:
    """Inside this block, the evaluation helpers gather their results across `accelerator`'s processes."""
    token = _ACCELERATOR.set(accelerator)
    try:
        yield
    finally:
        _ACCELERATOR.reset(token)


def is_sharded(loader: Any) -> bool:
    """True for a loader `accelerator.prepare` returned: under several processes each reads its own shard."""
    from accelerate.data_loader import DataLoaderStateMixin

    return isinstance(loader, DataLoaderStateMixin)


def gather_rows(rows: torch.Tensor, loader: Any, accelerator: Any = None) -> torch.Tensor:
    """One batch of `loader`'s per-example results (first dimension = examples) from every process, on the CPU.

    Under data parallelism each process scores its own shard of a prepared evaluation loader; without gathering,
    every process would report (and act on) a different number. `accelerator.gather_for_metrics` collects the rows
    of all processes in order and drops the duplicates accelerate adds to make the last batches even. It must be
    called once per batch of a prepared loader. A plain loader (one `fit` did not prepare, e.g. an `eval_fn`'s own)
    is read whole by every process, so its rows are already all there and come back unchanged, as they do with
    one process or outside `fit`.
    """
    accelerator = accelerator or _ACCELERATOR.get()
    if accelerator is None or accelerator.num_processes == 1 or not is_sharded(loader):
        return rows.cpu()
    return accelerator.gather_for_metrics(rows.to(accelerator.device)).cpu()


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device | str | None = None, accelerator: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run a classifier over `loader`; return (logits [n, classes], labels [n]).

    Under `fit` with several processes (or with `accelerator` given), the rows of every process's shard of a
    prepared loader are gathered, so each process gets the logits of the whole loader (see `gather_rows`).
    """
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")
        logits.append(gather_rows(model(**batch).logits.float(), loader, accelerator))
        labels.append(gather_rows(target, loader, accelerator))
    model.train(was_training)
    if not logits:
        raise MfkitError("The loader to predict on is empty.", "pass a loader over at least one example.")
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits. With C logits per example this is the right link, sigmoid is not:
    p_c = exp(z_c) / sum_k exp(z_k). (Sigmoid belongs to a single logit, or to independent multi-label outputs.)"""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification_scores(
    labels: Sequence[int], predictions: Sequence[int], positive: int = 1
) -> dict[str, float]:
    """Accuracy plus precision, recall and F1 of the `positive` class (and macro F1)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.size == 0:
        raise MfkitError(
            f"labels {labels.shape} and predictions {predictions.shape} differ or are empty.",
            "pass one prediction per label.",
        )
    p, r, f, _ = precision_recall_fscore_support(
        labels, predictions, labels=[positive], average=None, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": float(p[0]),
        "recall": float(r[0]),
        "f1": float(f[0]),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


@torch.no_grad()
def token_nll(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    accelerator: Any = None,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens.

    For a block x_1..x_T the model predicts x_{t+1} from x_1..x_t, so a block contributes T-1 predictions
    (positions whose label is -100 are skipped). Under `fit` with several processes the per-block sums of every
    process's shard of a prepared loader are gathered (see `gather_rows`), so every process gets the figures of the
    whole loader.
    """
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids = batch["input_ids"].to(device)
        labels = batch.get("labels", ids).to(device)
        mask = batch.get("attention_mask")
        logits = model(
            input_ids=ids, attention_mask=mask.to(device) if mask is not None else None
        ).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        losses = F.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
        )
        per_block = torch.stack(
            [losses.sum(dim=1).double(), (shift_labels != -100).sum(dim=1).double()], dim=1
        )
        per_block = gather_rows(per_block, loader, accelerator)
        total += float(per_block[:, 0].sum())
        count += int(per_block[:, 1].sum())
    model.train(was_training)
    if count == 0:
        raise MfkitError("No tokens to score.", "give token_nll a loader with blocks of at least two tokens.")
    return total, count


def perplexity(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> float:
    """exp(mean next-token NLL): the number of equally likely tokens the model is, on average, choosing among."""
    total, count = token_nll(model, loader, device, max_batches)
    return math.exp(total / count)


class UnigramLM:
    """The baseline every LM must beat: p(token) from training counts, ignoring all context (add-k smoothing)."""

    def __init__(self, vocab_size: int, smoothing: float = 1.0) -> None:
        self.vocab_size = vocab_size
        self.smoothing = smoothing
        self.counts: Counter[int] = Counter()
        self.total = 0

    def fit(self, token_ids: Iterable[int]) -> UnigramLM:
        for token in token_ids:
            self.counts[token] += 1
            self.total += 1
        return self

    def log_prob(self, token: int) -> float:
        return math.log(
            (self.counts[token] + self.smoothing) / (self.total + self.smoothing * self.vocab_size)
        )

    def perplexity(self, token_ids: Iterable[int]) -> float:
        """exp of the mean NLL over `token_ids`."""
        nll = [-self.log_prob(t) for t in token_ids]
        if not nll:
            raise MfkitError("No tokens to score.", "pass a non-empty sequence of token ids.")
        return math.exp(sum(nll) / len(nll))
