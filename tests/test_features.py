"""The head on cached features computes what the whole classifier computes, and trains the model's own head."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from mfkit.classify import Loaders
from mfkit.errors import MfkitError
from mfkit.features import FeatureHead, encoder_features, feature_loaders
from mfkit.loaders import make_loader
from mfkit.training import TrainConfig, fit


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def rows(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(ids[i, 0] % 2)}
        for i in range(n)
    ]


def test_feature_head_gives_the_models_logits() -> None:
    model = tiny_bert().eval()
    loader = make_loader(rows(), 8, shuffle=False)
    cached = encoder_features(model, loader, progress=False)
    head = FeatureHead(model).eval()
    features = torch.stack([r["features"] for r in cached])
    batch = next(iter(make_loader(rows(), 24, shuffle=False)))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        from_cache = head(features).logits
    assert torch.allclose(full, from_cache, atol=1e-5)
    assert [r["labels"] for r in cached] == batch["labels"].tolist()


def test_training_the_feature_head_trains_the_models_head_only() -> None:
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loader(rows(), 8, shuffle=False)
    loaders = feature_loaders(model, Loaders(loader, loader, loader), batch_size=8, progress=False)
    fit(FeatureHead(model), loaders.train, TrainConfig(max_steps=6, lr=1e-2, warmup=0, progress=False))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("classifier.", "bert.pooler.")) for k in changed), changed


def test_a_model_without_a_pooler_is_refused() -> None:
    model = GPT2ForSequenceClassification(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, num_labels=2)
    )
    with pytest.raises(MfkitError, match="BERT-style"):
        FeatureHead(model)
