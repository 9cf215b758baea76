"""What training does to a model's representations: one vector per text, a 2-D map, and numbers in full dimension.

A 2-D map (PCA, t-SNE) is a picture, not a measurement: t-SNE keeps neighbourhoods but not distances between
clusters, cluster sizes or axes, and two runs cannot be compared. So the separation of the classes is measured in the
vectors' own dimension: k-nearest-neighbour accuracy, the silhouette score and a linear probe's accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .errors import MfkitError, check_choice

POOLINGS = ("cls", "mean", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sequence from the last layer's states (batch, T, d): the first token's (`cls`, what a BERT
    classifier's head reads), the mean over real tokens (`mean`), or the last real token's (`last`, what a causal
    LM has read everything up to; right padding assumed)."""
    check_choice("pooling", how, POOLINGS)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    last = attention_mask.sum(1).long() - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]


@torch.no_grad()
def embed(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], how: str = "cls"
) -> tuple[np.ndarray, np.ndarray | None]:
    """The pooled last-layer vectors of every row of `batches` (rows in order), as float32 numpy (rows, d), and
    the batches' `labels` (None where they carry none)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out, labels = [], []
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            out.append(pool(hidden.float(), mask, how).cpu())
            if "labels" in batch:
                labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy(), (torch.cat(labels).numpy() if labels else None)


def separation(
    reference: np.ndarray, reference_labels: Any, vectors: np.ndarray, labels: Any, k: int = 5
) -> dict[str, float]:
    """How well the classes separate, in full dimension: the accuracy of k nearest neighbours (cosine) and of a
    logistic-regression probe, both fitted on `reference` and scored on `vectors`; and the silhouette of `vectors`
    by their labels (cosine; from -1 to 1: above 0, a vector is on average closer to its own class)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reference_labels, labels = np.asarray(reference_labels), np.asarray(labels)
    if len(np.unique(reference_labels)) < 2 or len(np.unique(labels)) < 2:
        raise MfkitError(
            "separation needs at least two classes among both the reference and the scored vectors.",
            "use more rows (a larger EVAL_LIMIT) so that every class appears.",
        )
    knn = KNeighborsClassifier(n_neighbors=min(k, len(reference)), metric="cosine").fit(
        reference, reference_labels
    )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
        reference, reference_labels
    )
    return {
        "knn_accuracy": float(knn.score(vectors, labels)),
        "probe_accuracy": float(probe.score(vectors, labels)),
        "silhouette": float(silhouette_score(vectors, labels, metric="cosine")),
    }


def maps(vectors: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Two 2-D pictures of `vectors`: PCA (a linear projection on the two directions of largest variance) and
    t-SNE (nonlinear, neighbourhoods only; its perplexity capped for small sets)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return {"PCA": PCA(n_components=2).fit_transform(vectors), "t-SNE": tsne.fit_transform(vectors)}
