"""Plots every notebook reuses: training curves, learning rates, confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .training import History


def plot_history(history: History, metric: str = "loss", ax=None, title: str | None = None, label: str = ""):
    """Training loss (and evaluation `eval_<metric>` where recorded) against optimizer steps."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    train = history.frame("train")
    if not train.empty:
        ax.plot(train["step"], train["loss"], label=f"{label} train loss".strip())
    evals = history.frame("eval")
    key = f"eval_{metric}" if f"eval_{metric}" in evals else metric
    if not evals.empty and key in evals:
        ax.plot(evals["step"], evals[key], "o-", label=f"{label} {key}".strip())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title or "training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_learning_rates(history: History, group_names: Sequence[str] | None = None, ax=None):
    """The learning rate of each parameter group over training (logged at each log point)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    train = history.frame("train")
    rates = np.array(train["lrs"].tolist())
    for i in range(rates.shape[1]):
        ax.plot(train["step"], rates[:, i], label=group_names[i] if group_names else f"group {i}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], ax=None, title: str = "confusion matrix"):
    """A confusion matrix with counts in each cell (rows: true class, columns: predicted)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(3.5, 3.2))[1]
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black"
        )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return ax
