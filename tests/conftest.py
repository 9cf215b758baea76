"""Fixtures shared by several test files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import mfkit
from mfkit.cli import main


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


SMOKE_JOBS = 2  # two kernels with one thread each: the fastest way through the chain on 2 cores


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory) -> dict:
    """The whole chain in `smoke`, run once per test session and shared by every test that needs its outputs:
    its summary, plus `exit_code` and `output` (the run folder: executed notebooks, artifacts/, summary.json)."""
    output = tmp_path_factory.mktemp("chain")
    code = main(["run", "--profile", "smoke", "--jobs", str(SMOKE_JOBS), "--output", str(output)])
    summary = json.loads((output / "summary.json").read_text())
    return {**summary, "exit_code": code, "output": output}
