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
    """A confusion matrix with counts in each cell (rows: true class, columns: predicted), drawn by
    scikit-learn's `ConfusionMatrixDisplay`."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    ax = ax or plt.subplots(figsize=(3.5, 3.2))[1]
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(labels)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return ax
