"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import mfkit


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """A randomly initialised two-class (ham/spam) BERT classifier with MiniLM's tokenizer, saved like the chain
    saves one (a `from_pretrained` folder)."""
    torch.manual_seed(0)
    tokenizer = mfkit.load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "ham", 1: "spam"},
        label2id={"ham": 0, "spam": 1},
    )
    folder = tmp_path_factory.mktemp("tiny") / "03-classifier"
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
