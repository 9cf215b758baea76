"""A head trained on cached features: run the frozen encoder once, then train only the head on its outputs.

While the encoder is frozen, every training step would push the same mails through the same encoder again. The
encoder's output for each mail (the `[CLS]` vector, which is what a BERT-style head reads) can be computed once
and kept; head-only training is then a tiny model on a table of vectors, and many epochs of it cost less than one
pass of the encoder. The head modules are shared with the full model, so training them here trains the model's
own head: afterwards the whole classifier predicts exactly as the head did on the cached vectors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.modeling_outputs import SequenceClassifierOutput

from .classify import Loaders
from .errors import MfkitError
from .loaders import make_loader
from .timing import model_inputs

Rows = list[dict[str, Any]]


class FeatureHead(nn.Module):
    """The head of a BERT-style sequence classifier (pooler, dropout, classifier) applied to cached `[CLS]` vectors.

    The modules are the model's own (not copies): training a `FeatureHead` trains the model's head.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        pooler = getattr(model.base_model, "pooler", None)
        if pooler is None or not hasattr(model, "classifier") or not hasattr(model, "dropout"):
            raise MfkitError(
                f"{type(model).__name__} is not a BERT-style classifier with a pooler, dropout and classifier.",
                "cache features of a BERT-family model (e.g. minilm), or train the head with the encoder frozen.",
            )
        self.pooler, self.dropout, self.classifier = pooler, model.dropout, model.classifier

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        pooled = self.pooler(
            features.unsqueeze(1)
        )  # the pooler reads position 0 of a [batch, T, hidden] input
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def encoder_features(
    model: nn.Module, loader: DataLoader, progress: bool = True, desc: str = "encode"
) -> Rows:
    """The frozen encoder's `[CLS]` vector of every example of `loader`, in loader order, with its label."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: Rows = []
    for batch in tqdm(loader, desc=desc, disable=not progress):
        labels = batch["labels"]
        cls = model.base_model(**model_inputs(batch, device)).last_hidden_state[:, 0].float().cpu()
        rows.extend(
            {"features": vector, "labels": int(label)} for vector, label in zip(cls, labels, strict=True)
        )
    model.train(was_training)
    return rows


def feature_loaders(
    model: nn.Module, loaders: Loaders, batch_size: int, seed: int = 0, progress: bool = True
) -> Loaders:
    """Encode the three splits of `loaders` once; return loaders over the cached vectors (train shuffled by seed)."""
    cached = {
        split: encoder_features(model, loader, progress, desc=f"encode {split}")
        for split, loader in loaders._asdict().items()
    }
    return Loaders(
        train=make_loader(cached["train"], batch_size, shuffle=True, seed=seed),
        validation=make_loader(cached["validation"], 2 * batch_size, shuffle=False),
        test=make_loader(cached["test"], 2 * batch_size, shuffle=False),
    )
