"""Continual, incremental and online learning: EWC, replay, forgetting metrics, a drift detector, a prequential loop.

Two settings share this module.

*Sequential tasks* (an LM trained on one corpus, then on another): `fisher_diagonal` and `EWC` anchor the weights
that mattered for the old task (Kirkpatrick et al., 2017), `replay_loader` mixes a share of old examples into every
new batch, and `continual_metrics` turns a matrix of losses into average performance, forgetting and backward
transfer. `EWC.loss_fn` and `replay_loader` plug into `mfkit.training.fit` unchanged (a loss function and a
DataLoader), so the training loop stays the one every notebook uses.

*A stream* of labelled examples (mails arriving one mini-batch at a time): `prequential` tests each mini-batch
before it trains on it, `DDM` watches the running error for drift (Gama et al., 2004), and three learners differ
only in when they learn: always (`OnlineLearner`, optionally raising its rate on drift), only at first
(`FrozenAfter`), or from scratch now and then (`PeriodicRetrain`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from .errors import MfkitError, check_positive
from .training import Batch, LossFn, default_loss

# --------------------------------------------------------------------------------------------------------------
# EWC: a quadratic anchor weighted by the diagonal Fisher information


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter, names without the prefixes of DDP's (`module.`) and
    torch.compile's (`_orig_mod.`) wrappers, so that anchors taken outside `fit` match the model inside it."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            # accelerate compiles the DDP wrapper (`_orig_mod.module.`); a model compiled by hand may be wrapped
            yield name.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("_orig_mod."), param


def fisher_diagonal(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn = default_loss,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher information: the mean over batches of each squared loss gradient.

    F_i = E[(dL/dθ_i)^2], with L the loss of one batch on the observed labels. Feed batches of ONE example (a
    block, a mail) for the textbook estimate: the square of a batch-mean gradient is smaller than the mean of the
    per-example squares, because the example gradients partly cancel. The model is left unchanged (its gradients
    are cleared).
    """
    if max_batches is not None:
        check_positive("max_batches", max_batches)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the function the anchor computes
    fisher = {name: torch.zeros_like(p) for name, p in _trainable(model)}
    if not fisher:
        raise MfkitError("The model has no trainable parameters.", "unfreeze the weights EWC should protect.")
    device = next(model.parameters()).device
    batches = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        model.zero_grad(set_to_none=True)
        loss_fn(model, {k: v.to(device) for k, v in batch.items()}).backward()
        for name, param in _trainable(model):
            if param.grad is not None:
                fisher[name] += param.grad.detach() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if batches == 0:
        raise MfkitError("The Fisher loader yields no batches.", "pass a loader over some old-task examples.")
    return {name: f / batches for name, f in fisher.items()}


@dataclass
class EWC:
    """Elastic weight consolidation: penalty(θ) = λ/2 Σ_i F_i (θ_i − θ*_i)².

    `anchor` holds θ* (the weights after the old task) and `fisher` the F_i of the same parameters, by name. Its
    gradient is λ F_i (θ_i − θ*_i): a spring per weight, stiff where the old task's loss is sharply curved.
    """

    anchor: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    lam: float

    @classmethod
    def from_model(cls, model: nn.Module, fisher: Mapping[str, torch.Tensor], lam: float) -> EWC:
        """Anchor at the model's current weights (call it right after the old task)."""
        check_positive("lam", lam, allow_zero=True)
        anchor = {name: p.detach().clone() for name, p in _trainable(model)}
        missing = sorted(set(anchor) - set(fisher))
        if missing:
            raise MfkitError(
                f"The Fisher estimate has no entry for {missing[:3]} ({len(missing)} parameters).",
                "estimate it with fisher_diagonal on the same model, with the same parameters trainable.",
            )
        return cls(anchor, {name: fisher[name].detach() for name in anchor}, float(lam))

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """λ/2 Σ F (θ − θ*)² over the anchored parameters of `model` (a scalar on the model's device)."""
        total = None
        for name, param in _trainable(model):
            if name in self.anchor:
                anchor = self.anchor[name].to(param.device)
                term = (self.fisher[name].to(param.device) * (param - anchor) ** 2).sum()
                total = term if total is None else total + term
        if total is None:
            raise MfkitError(
                "None of the model's trainable parameters is anchored.",
                "build the EWC anchor from this model (EWC.from_model) before training it further.",
            )
        return 0.5 * self.lam * total

    def loss_fn(self, base: LossFn = default_loss) -> LossFn:
        """A loss for `fit`: the task loss of `base` plus the EWC penalty."""

        def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
            return base(model, batch) + self.penalty(model)

        return loss


# --------------------------------------------------------------------------------------------------------------
# Replay: old examples mixed into every new batch


def replay_counts(batch_size: int, share: float) -> tuple[int, int]:
    """(new, old) rows per mixed batch: `batch_size` new rows plus old ones making up `share` of the batch.

    The new rows per batch stay what they were without replay, so the new-task budget does not change; the old
    rows come on top (the batch grows by a factor 1 / (1 − share)).
    """
    check_positive("batch_size", batch_size)
    if not 0 <= share < 1:
        raise MfkitError(f"share={share} is outside [0, 1).", "pass the share of old rows, e.g. 0.25.")
    return batch_size, round(batch_size * share / (1 - share))


class ReplayBatchSampler(Sampler[list[int]]):
    """Batches of indices into `ConcatDataset([new, old])`: every new row once per epoch, old rows drawn at random.

    The order is a pure function of (seed, epoch), like `mfkit.loaders.EpochSampler`.
    """

    def __init__(self, n_new: int, n_old: int, new_per_batch: int, old_per_batch: int, seed: int = 0) -> None:
        check_positive("n_new", n_new)
        if old_per_batch and not n_old:
            raise MfkitError(
                "Replay asks for old rows, but the old dataset is empty.", "pass some old examples."
            )
        self.n_new, self.n_old = n_new, n_old
        self.new_per_batch, self.old_per_batch = new_per_batch, old_per_batch
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_new // self.new_per_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        new = torch.randperm(self.n_new, generator=generator).tolist()
        for b in range(len(self)):
            rows = new[b * self.new_per_batch : (b + 1) * self.new_per_batch]
            if self.old_per_batch:
                old = torch.randint(self.n_old, (self.old_per_batch,), generator=generator)
                rows += (self.n_new + old).tolist()
            yield rows


def replay_loader(
    new: Dataset, old: Dataset, batch_size: int, share: float, collate_fn: Callable, seed: int = 0
) -> DataLoader:
    """A training loader over `new` whose every batch also holds old rows making up `share` of it.

    `share=0` gives plain batches of `new`. See `replay_counts` for the batch composition.
    """
    n_new, n_old = replay_counts(batch_size, share)
    if len(new) < n_new:
        raise MfkitError(f"The new data has {len(new)} rows, less than one batch.", "pass more data.")
    sampler = ReplayBatchSampler(len(new), len(old), n_new, n_old, seed)
    return DataLoader(ConcatDataset([new, old]), batch_sampler=sampler, collate_fn=collate_fn)


# --------------------------------------------------------------------------------------------------------------
# Metrics over a sequence of tasks


def continual_metrics(losses: Sequence[Sequence[float]]) -> dict[str, float]:
    """Average loss, average forgetting and backward transfer from a T × T matrix of losses.

    `losses[k][j]` is the loss on task j after training on tasks 1..k (lower is better). With performance
    a = −loss, the definitions of Chaudhry et al. (2018) and Lopez-Paz & Ranzato (2017) become:

    - average loss after the last task: (1/T) Σ_j L[T, j];
    - forgetting of task j: max_{l<T} (−L[l, j]) − (−L[T, j]) = L[T, j] − min_{l<T} L[l, j] (≥ 0 is forgetting),
      averaged over j < T;
    - backward transfer: (1/(T−1)) Σ_{j<T} (a[T, j] − a[j, j]) = (1/(T−1)) Σ_{j<T} (L[j, j] − L[T, j])
      (negative: later tasks hurt earlier ones).
    """
    matrix = np.asarray(losses, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise MfkitError(
            f"losses has shape {matrix.shape}, not a square matrix of at least 2 tasks.",
            "pass losses[k][j] = loss on task j after training on task k, for k, j in 1..T.",
        )
    last = matrix[-1]
    earlier = range(len(matrix) - 1)
    return {
        "average_loss": float(last.mean()),
        "forgetting": float(np.mean([last[j] - matrix[:-1, j].min() for j in earlier])),
        "backward_transfer": float(np.mean([matrix[j, j] - last[j] for j in earlier])),
    }


# --------------------------------------------------------------------------------------------------------------
# Drift detection on a stream of errors


@dataclass
class DDM:
    """The drift detection method of Gama et al. (2004) on a stream of 0/1 errors.

    After n examples with error rate p_n, s_n = sqrt(p_n (1 − p_n) / n). The detector keeps the point where
    p + s was lowest (p_min, s_min) and reports "warning" when p_n + s_n ≥ p_min + warning·s_min and "drift" when
    p_n + s_n ≥ p_min + drift·s_min; after a drift it starts counting afresh. Nothing is reported during the
    first `min_examples`: Gama et al. used 30, but the minimum of p + s over a short, noisy start is often too low
    (with 30 examples and a 10% error rate, no error at all happens 4% of the time), which makes false alarms
    later; 100 makes them rarer at the cost of a slower start.
    """

    warning: float = 2.0
    drift: float = 3.0
    min_examples: int = 100
    n: int = 0
    errors: int = 0
    p_min: float = math.inf
    s_min: float = math.inf
    drifts: list[int] = field(default_factory=list)
    seen: int = 0

    def reset(self) -> None:
        self.n, self.errors, self.p_min, self.s_min = 0, 0, math.inf, math.inf

    def update(self, error: bool | int) -> str:
        """Add one example's error (1) or success (0); return "stable", "warning" or "drift"."""
        self.seen += 1
        self.n += 1
        self.errors += int(bool(error))
        p = self.errors / self.n
        s = math.sqrt(p * (1 - p) / self.n)
        if self.n < self.min_examples:
            return "stable"
        if p + s < self.p_min + self.s_min:
            self.p_min, self.s_min = p, s
        if p + s >= self.p_min + self.drift * self.s_min:
            self.drifts.append(self.seen)
            self.reset()
            return "drift"
        if p + s >= self.p_min + self.warning * self.s_min:
            return "warning"
        return "stable"


# --------------------------------------------------------------------------------------------------------------
# A stream: test each mini-batch, then train on it


class Learner(Protocol):
    """What `prequential` drives: predict a batch, then learn from it (told its own predictions)."""

    examples_trained: int

    def predict(self, X: Any) -> np.ndarray: ...
    def learn(self, X: Any, y: np.ndarray, predicted: np.ndarray) -> None: ...


@dataclass
class StreamResult:
    """Every prediction of a prequential run, in stream order, with what the learner spent."""

    y_true: np.ndarray
    y_pred: np.ndarray
    seconds: float
    examples_trained: int
    drifts: list[int] = field(default_factory=list)

    def f1(self) -> float:
        from sklearn.metrics import f1_score

        return float(f1_score(self.y_true, self.y_pred, zero_division=0))

    def windowed_f1(self, window: int) -> np.ndarray:
        """F1 of the positive class over consecutive windows of `window` examples (one value per window)."""
        from sklearn.metrics import f1_score

        check_positive("window", window)
        return np.array(
            [
                f1_score(self.y_true[i : i + window], self.y_pred[i : i + window], zero_division=0)
                for i in range(0, len(self.y_true) - window + 1, window)
            ]
        )


def prequential(learner: Learner, X: Any, y: Sequence[int], batch_size: int) -> StreamResult:
    """Test-then-train over the stream (X, y) in order, one mini-batch at a time.

    Every example is predicted by a model that has not trained on it yet, so the predictions are an honest
    held-out score of the whole stream, and no example is used twice for scoring.
    """
    check_positive("batch_size", batch_size)
    y = np.asarray(y)
    if len(y) == 0 or X.shape[0] != len(y):
        raise MfkitError(
            f"The stream has {X.shape[0]} inputs and {len(y)} labels.", "pass one label per input."
        )
    predictions = []
    start = time.perf_counter()
    for i in range(0, len(y), batch_size):
        xb, yb = X[i : i + batch_size], y[i : i + batch_size]
        predicted = np.asarray(learner.predict(xb))
        predictions.append(predicted)
        learner.learn(xb, yb, predicted)
    seconds = time.perf_counter() - start
    detector = getattr(learner, "detector", None)
    return StreamResult(
        y,
        np.concatenate(predictions),
        seconds,
        learner.examples_trained,
        list(detector.drifts) if detector else [],
    )


def _sgd_passes(
    model: Any, X: Any, y: np.ndarray, epochs: int, batch_size: int, seed: int, classes: Any
) -> int:
    """`epochs` shuffled passes of `partial_fit` in mini-batches; returns the examples processed."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), batch_size):
            rows = order[i : i + batch_size]
            model.partial_fit(X[rows], y[rows], classes=classes)
    return epochs * len(y)


class _SGDLearner:
    """Shared parts: a scikit-learn model with `partial_fit`, the classes, and a count of examples trained on."""

    def __init__(self, make_model: Callable[[], Any], classes: Sequence[int] = (0, 1)) -> None:
        self.make_model, self.classes = make_model, np.asarray(classes)
        self.model = make_model()
        self.fitted = False
        self.examples_trained = 0

    def predict(self, X: Any) -> np.ndarray:
        if not self.fitted:  # nothing learned yet: predict the first class (for spam: "ham")
            return np.full(X.shape[0], self.classes[0])
        return self.model.predict(X)

    def _partial_fit(self, X: Any, y: np.ndarray) -> None:
        self.model.partial_fit(X, y, classes=self.classes)
        self.fitted = True
        self.examples_trained += len(y)


class OnlineLearner(_SGDLearner):
    """One `partial_fit` step per mini-batch. With a `detector`, the learning rate is multiplied by `boost` for
    `boost_batches` mini-batches after each drift it signals (the model's `eta0`, so use `learning_rate="constant"`).
    """

    def __init__(
        self,
        make_model: Callable[[], Any],
        detector: DDM | None = None,
        boost: float = 5.0,
        boost_batches: int = 10,
        classes: Sequence[int] = (0, 1),
    ) -> None:
        super().__init__(make_model, classes)
        self.detector, self.boost, self.boost_batches = detector, boost, boost_batches
        self.base_lr = getattr(self.model, "eta0", None)
        self.boost_left = 0
        self.lr_trace: list[float] = []

    def learn(self, X: Any, y: np.ndarray, predicted: np.ndarray) -> None:
        if self.detector is not None and self.fitted:
            states = [self.detector.update(e) for e in (predicted != y)]
            if "drift" in states:
                self.boost_left = self.boost_batches
            lr = self.base_lr * (self.boost if self.boost_left else 1.0)
            self.model.set_params(eta0=lr)
            self.boost_left = max(0, self.boost_left - 1)
        self.lr_trace.append(float(getattr(self.model, "eta0", math.nan)))
        self._partial_fit(X, y)


class FrozenAfter(_SGDLearner):
    """Learns online from the first `period` examples of the stream, then only predicts."""

    def __init__(self, make_model: Callable[[], Any], period: int, classes: Sequence[int] = (0, 1)) -> None:
        check_positive("period", period)
        super().__init__(make_model, classes)
        self.period, self.seen = period, 0

    def learn(self, X: Any, y: np.ndarray, predicted: np.ndarray) -> None:
        keep = max(0, min(len(y), self.period - self.seen))
        if keep:
            self._partial_fit(X[:keep], y[:keep])
        self.seen += len(y)


class PeriodicRetrain(_SGDLearner):
    """Keeps every example seen; every `every` examples, trains a fresh model on all of them for `epochs` passes.

    Before the first retraining it learns online (like every other learner in the first period); between
    retrainings it does not learn at all, like a model redeployed on a schedule.
    """

    def __init__(
        self,
        make_model: Callable[[], Any],
        every: int,
        epochs: int = 3,
        batch_size: int = 32,
        seed: int = 0,
        classes: Sequence[int] = (0, 1),
    ) -> None:
        check_positive("every", every)
        check_positive("epochs", epochs)
        super().__init__(make_model, classes)
        self.every, self.epochs, self.batch_size, self.seed = every, epochs, batch_size, seed
        self.X: list[Any] = []
        self.y: list[np.ndarray] = []
        self.seen, self.retrains = 0, 0

    def learn(self, X: Any, y: np.ndarray, predicted: np.ndarray) -> None:
        self.X.append(X)
        self.y.append(y)
        before, self.seen = self.seen, self.seen + len(y)
        if not self.retrains:
            self._partial_fit(X, y)
        if self.seen // self.every > before // self.every:
            from scipy import sparse

            stack = sparse.vstack if sparse.issparse(X) else np.vstack
            X_all, y_all = stack(self.X), np.concatenate(self.y)
            self.model = self.make_model()
            self.examples_trained += _sgd_passes(
                self.model,
                X_all,
                y_all,
                self.epochs,
                self.batch_size,
                self.seed + self.retrains,
                self.classes,
            )
            self.fitted = True
            self.retrains += 1


def fit_passes(
    model: Any,
    X: Any,
    y: Sequence[int],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    classes: Sequence[int] = (0, 1),
) -> tuple[Any, int, float]:
    """Train `model` (fresh or already trained) with `epochs` shuffled passes of `partial_fit` over (X, y).

    Returns (model, examples processed, seconds): the compute of an incremental update or of a retraining.
    """
    check_positive("epochs", epochs)
    check_positive("batch_size", batch_size)
    start = time.perf_counter()
    processed = _sgd_passes(model, X, np.asarray(y), epochs, batch_size, seed, np.asarray(classes))
    return model, processed, time.perf_counter() - start


def clone_model(model: Any) -> Any:
    """A deep copy of a fitted model (so an incremental update does not change the original)."""
    return copy.deepcopy(model)


# --------------------------------------------------------------------------------------------------------------
# The spam stream, easy groups first


def group_difficulty(
    texts: Sequence[str], labels: Sequence[int], groups: Sequence[str], folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Each group's error rate under out-of-fold predictions of a TF-IDF logistic regression.

    Every mail is predicted by a model trained on the other folds, so the rate says how hard the group's mails
    are for a bag-of-words classifier, not how well it memorized them.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from .classify import tfidf_pipeline

    labels, groups = np.asarray(labels), np.asarray(groups)
    if not len(texts) == len(labels) == len(groups):
        raise MfkitError("texts, labels and groups differ in length.", "pass one label and group per text.")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(tfidf_pipeline(), list(texts), labels, cv=splitter)
    return {
        str(g): float(np.mean(predicted[groups == g] != labels[groups == g])) for g in sorted(set(groups))
    }


def easy_first_order(
    labels: Sequence[int], groups: Sequence[str], difficulty: Mapping[str, float], seed: int = 0
) -> np.ndarray:
    """Indices of a stream ordered by group difficulty, easy first, with each class's share kept steady.

    Each class's examples are lined up group by group (easiest group first, shuffled inside a group), and the
    class lines are merged by relative position, so spam keeps its overall share at every point of the stream
    while the groups within each class change from easy to hard.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    unknown = sorted(set(groups) - set(difficulty))
    if unknown:
        raise MfkitError(f"No difficulty for the groups {unknown}.", "measure them with group_difficulty.")
    rng = np.random.default_rng(seed)
    keys, order = [], []
    for label in np.unique(labels):
        line: list[int] = []
        for group in sorted(set(groups[labels == label]), key=lambda g: (difficulty[g], g)):
            members = np.flatnonzero((labels == label) & (groups == group))
            line.extend(rng.permutation(members).tolist())
        order.extend(line)
        keys.extend((np.arange(len(line)) + 0.5) / len(line))
    return np.asarray(order)[np.argsort(keys, kind="stable")]


# --------------------------------------------------------------------------------------------------------------
# Evaluating an LM on several corpora during `fit`


def corpus_losses(
    loaders: Mapping[str, DataLoader], monitor: str
) -> Callable[[nn.Module, Any], dict[str, float]]:
    """An `eval_fn` for `fit`: the mean next-token loss on each of `loaders`, as `<name>_loss`.

    `eval_loss` repeats the loss of `loaders[monitor]`, the figure `fit` monitors. The loader `fit` passes is
    ignored.
    """
    from .metrics import token_nll

    if monitor not in loaders:
        raise MfkitError(
            f"monitor={monitor!r} is not among the loaders {sorted(loaders)}.", "name one of them."
        )

    def evaluate(model: nn.Module, _loader: Any = None) -> dict[str, float]:
        scores = {}
        for name, loader in loaders.items():
            total, count = token_nll(model, loader)
            scores[f"{name}_loss"] = total / count
        return {"eval_loss": scores[f"{monitor}_loss"], **scores}

    return evaluate


def block_losses(model: nn.Module, loader: DataLoader) -> np.ndarray:
    """The mean next-token loss (nats per predicted token) of every block of `loader`, in loader order.

    These are the per-example scores that a paired comparison of two language models resamples: both models are
    scored on the same blocks, so `evaluation.compare_methods(labels, losses_a, losses_b, metric=mean_loss)`
    (any `labels` of the same length; they are not read) says whether a's loss is above, below or not clearly
    different from b's. With blocks of equal length (`lm.pack_blocks`), their mean is the loss over all tokens.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in loader:
            ids = batch["input_ids"].to(device)
            labels = batch.get("labels", ids).to(device)
            logits = model(input_ids=ids).logits.float()
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
            )
            counted = (labels[:, 1:] != -100).sum(dim=1).clamp(min=1)
            losses.append((per_token.sum(dim=1) / counted).double().cpu())
    model.train(was_training)
    if not losses:
        raise MfkitError("The loader yields no blocks.", "pass a loader over some held-out blocks.")
    return torch.cat(losses).numpy()


def mean_loss(_labels: np.ndarray, losses: np.ndarray) -> float:
    """The metric of `block_losses` for `evaluation.compare_methods`: the mean of the per-block losses (lower is
    better, so "below" is the better side)."""
    return float(np.mean(losses))
