"""`mfkit bench`: the FLOPs count behind MFU, the summary ratios, and one tiny end-to-end run of all three runners."""

from __future__ import annotations

import json

import pytest
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from mfkit import bench
from mfkit.cli import main


def test_matmul_parameters_count_linear_weights_not_embeddings():
    vocab, d, layers = 50, 16, 2
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=8, n_embd=d, n_layer=layers, n_head=2))
    # per block: qkv (d x 3d), attention out (d x d), MLP up (d x 4d) and down (4d x d) = 12 d^2; plus the tied LM head
    assert bench.matmul_parameters(gpt) == layers * 12 * d * d + vocab * d
    bert = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=4 * d, num_labels=2))
    # no LM head: the word embeddings are a lookup; the pooler (d x d) and the classifier (d x 2) multiply
    assert bench.matmul_parameters(bert) == layers * 12 * d * d + d * d + 2 * d


def test_summarize_takes_medians_and_ratios():
    runs = [{"workload": "w", "runner": r, "tokens_per_s": t, "samples_per_s": t / 10, "peak_memory_mb": 1.0,
             "model_tflops_per_s": 0.0, "device": "cpu"}
            for r, t in [("fit", 100), ("fit", 120), ("fit", 110), ("trainer", 100), ("bare", 120)]]
    rows = {row["runner"]: row for row in bench.summarize(runs)}
    assert rows["fit"]["tokens_per_s"] == 110 and rows["fit"]["repeats"] == 3
    assert rows["fit"]["fit/trainer"] == pytest.approx(1.1) and rows["fit"]["fit/bare"] == pytest.approx(110 / 120)
    assert rows["trainer"]["fit/trainer"] is None and rows["fit"]["mfu"] is None  # no MFU off CUDA
    assert "1.100" in bench.format_table(list(rows.values()))


@pytest.mark.slow
def test_bench_runs_all_three_runners(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--workload", "tiny-gpt", "--steps", "2", "--warmup", "1", "--repeats", "1",
                 "--batch-size", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["runner"] for r in report["runs"]} == {"fit", "trainer", "bare"}
    assert all(r["tokens_per_s"] > 0 for r in report["runs"])
    fit_row = next(r for r in report["summary"] if r["runner"] == "fit")
    assert fit_row["fit/trainer"] > 0 and fit_row["fit/bare"] > 0
    assert "fit/Trainer" in capsys.readouterr().out
