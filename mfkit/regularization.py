"""Regularizers for `fit`, and the numbers that show how strongly each one acts.

    label_smoothing_loss(...)          cross-entropy against smoothed targets, for `fit(..., loss_fn=...)`
    with_l1(...)                       the loss plus an L1 penalty (a subgradient: no exact zeros, see its doc)
    ProximalL1(...)                    decoupled L1: a soft-threshold step after every optimizer step (exact zeros)
    decayed_weights(...)               the weight matrices weight decay and L1 act on (no biases, no norms)
    lr_sum(...)                        sum of the learning rates of a run: eta * lambda * S, measured exactly
    weight_report(...)                 norm against the starting weights, and the share of exact zeros
    cross_entropy_of_positive(...)     mean cross-entropy from p(class 1): a metric for `compare_methods`

**How strong is a regularizer?** Decoupled weight decay multiplies the decayed weights by $1 - \\eta_t \\lambda$ at
step $t$, so over a run they shrink by $\\prod_t (1 - \\eta_t\\lambda) \\approx \\exp(-\\lambda \\sum_t \\eta_t)$: the
product $\\lambda \\sum_t \\eta_t$ (`lr_sum` times lambda; $\\eta\\lambda S$ at a constant rate) must be of order 0.1
before the weights move by about 10%. A soft threshold of $\\eta_t\\alpha$ per step moves a weight by at most
$\\alpha\\sum_t\\eta_t$ in all, so every weight that starts closer to zero than that (and that the task's gradient
does not hold up) ends at exactly zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import MfkitError, check_positive
from .optim import lr_multiplier, warmup_steps_of
from .training import Batch, Callback, LossFn, TrainState, default_loss


def label_smoothing_loss(smoothing: float) -> LossFn:
    """Cross-entropy against targets (1 - eps) * onehot(y) + eps / C (Szegedy et al., 2016), for `fit(loss_fn=...)`."""
    if not 0 <= smoothing < 1:
        raise MfkitError(f"smoothing={smoothing!r} is not in [0, 1).", "pass e.g. 0.1.")

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return F.cross_entropy(model(**inputs).logits.float(), batch["labels"], label_smoothing=smoothing)

    return loss


def decayed_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weight matrices (and embeddings) of `model`: biases and normalisation weights excluded,
    as in AdamW's decay groups (`mfkit.optim.parameter_groups`)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]


def with_l1(strength: float, loss_fn: LossFn = default_loss) -> LossFn:
    """`loss_fn` plus strength * sum |w| over `decayed_weights`: the L1 penalty added to the loss.

    Its subgradient, strength * sign(w), has the same size for small weights as for large ones, so the *minimizer*
    of the penalized loss is sparse. Gradient steps on it do not reach that minimizer's zeros: a weight near 0
    jumps from side to side of it, and under Adam (which divides every gradient by its running scale) it moves by
    about the learning rate per step whatever `strength` is. For exact zeros use `ProximalL1`."""
    check_positive("strength", strength, allow_zero=True)

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        penalty = sum(p.abs().sum() for p in decayed_weights(model))
        return loss_fn(model, batch) + strength * penalty

    return loss


def soft_threshold(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """sign(w) * max(|w| - threshold, 0) in place: the proximal operator of threshold * |w|."""
    return weights.copy_(weights.sign() * (weights.abs() - threshold).clamp_min(0))


class ProximalL1(Callback):
    """Decoupled L1 for `fit(..., callbacks=[ProximalL1(alpha)])`: after every optimizer step, each of the
    `decayed_weights` is soft-thresholded by lr_t * alpha (lr_t: the learning rate of that step and group).

    With plain SGD this is the proximal gradient method (ISTA) for loss + alpha * sum |w|, whose step lands on
    exact zeros; with Adam it is the L1 counterpart of AdamW's decoupled decay: the penalty acts beside the
    adaptive step instead of through it. It runs as a hook on the optimizer, so the evaluations `fit` makes after
    a step already see the thresholded weights."""

    def __init__(self, alpha: float) -> None:
        check_positive("alpha", alpha, allow_zero=True)
        self.alpha = alpha
        self._handle: Any = None

    def on_train_begin(self, state: TrainState) -> None:
        inner = getattr(state.optimizer, "optimizer", state.optimizer)  # accelerate wraps the torch optimizer
        self._handle = inner.register_step_post_hook(self._after_step)

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        for group in optimizer.param_groups:
            threshold = group["lr"] * self.alpha
            for p in group["params"]:
                if p.ndim >= 2 and p.requires_grad and threshold > 0:
                    soft_threshold(p, threshold)

    def on_train_end(self, state: TrainState) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def lr_sum(max_steps: int, lr: float, warmup: float = 0.0, schedule: str = "linear") -> float:
    """sum_t eta_t over a run of `fit` (the same warmup and schedule rule): weight decay lambda shrinks the decayed
    weights by about exp(-lambda * lr_sum), and a soft threshold alpha moves a weight by at most alpha * lr_sum."""
    check_positive("lr", lr)
    warm = warmup_steps_of(warmup, max_steps)
    return float(sum(lr * lr_multiplier(step, max_steps, warm, schedule) for step in range(max_steps)))


@torch.no_grad()
def weight_report(model: nn.Module, start: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Over `decayed_weights(model)`: `weights` (how many), `zero_share` (the share exactly 0), `norm` (their
    Euclidean norm) and, given `start` (a state_dict of the starting weights), `norm_ratio` (norm / the same
    weights' norm at the start) and `moved` (||w - w_start|| / ||w_start||)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    if not named:
        raise MfkitError("The model has no trainable weight matrices.", "pass the model that was trained.")
    count = sum(p.numel() for _, p in named)
    zeros = sum(int((p == 0).sum()) for _, p in named)
    norm = float(torch.sqrt(sum((p.double() ** 2).sum() for _, p in named)))
    report = {"weights": float(count), "zero_share": zeros / count, "norm": norm}
    if start is not None:
        missing = [n for n, _ in named if n not in start]
        if missing:
            raise MfkitError(
                f"`start` has no weights named {missing[:3]}.", "pass the state_dict of the same model."
            )
        base = torch.sqrt(sum((start[n].double() ** 2).sum() for n, _ in named))
        moved = torch.sqrt(sum(((p.double() - start[n].double().to(p.device)) ** 2).sum() for n, p in named))
        report["norm_ratio"] = norm / float(base)
        report["moved"] = float(moved / base)
    return report


def cross_entropy_of_positive(labels: Any, positive_probs: Any, eps: float = 1e-7) -> float:
    """Mean cross-entropy -log p(true class) of a two-class model, from p(class 1) per example: a metric of
    (labels, scores) that `evaluation.compare_methods` and `bootstrap_ci` can resample (lower is better)."""
    labels = np.asarray(labels)
    p = np.clip(np.asarray(positive_probs, dtype=np.float64), eps, 1 - eps)
    if p.shape != labels.shape or len(p) == 0:
        raise MfkitError(
            f"{p.shape} probabilities for {labels.shape} labels.", "pass one p(class 1) per example."
        )
    return float(-np.mean(np.where(labels == 1, np.log(p), np.log1p(-p))))
