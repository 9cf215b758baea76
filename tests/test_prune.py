"""Unit tests of mfkit.prune: magnitude pruning, head/neuron importance and removal, saving (a few seconds)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from mfkit import MfkitError, prune


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=2,
        initializer_range=0.3,  # large weights: removing a unit visibly changes the logits
    )
    return BertForSequenceClassification(config).eval()


def batch(n: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])[:n]}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


# ------------------------------------------------------------------ unstructured


@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_global_magnitude_pruning_reaches_the_sparsity_and_cuts_the_smallest_weights(target):
    model = tiny_bert()
    weights = torch.cat([m.weight.detach().abs().flatten() for m, _ in prune.encoder_linears(model)])
    reached = prune.global_magnitude_prune(model, target)
    assert reached == pytest.approx(target, abs=1e-3)
    kept = torch.cat([m.weight.detach().abs().flatten() for m, _ in prune.encoder_linears(model)])
    # one global threshold: every surviving weight is at least as large as every pruned one
    assert kept[kept > 0].min() >= weights[kept == 0].max()
    # the classifier head and embeddings are not touched
    assert float((model.classifier.weight == 0).float().mean()) == 0.0


def test_iterative_pruning_accumulates_masks_and_shares_the_step_budget():
    model = tiny_bert()
    calls = []
    reached = prune.prune_retrain(model, 0.8, rounds=3, steps=10, retrain=lambda m, n: calls.append(n))
    assert calls == [4, 3, 3]
    assert reached == sorted(reached) and reached[-1] == pytest.approx(0.8, abs=1e-3)
    assert prune.cubic_schedule(0.8, 1) == [0.8]
    prune.make_permanent(model)
    assert not any(hasattr(m, "weight_mask") for m, _ in prune.encoder_linears(model))
    assert prune.sparsity(model) == pytest.approx(0.8, abs=1e-3)


def test_masked_weights_stay_zero_through_a_training_step():
    model = tiny_bert().train()
    prune.global_magnitude_prune(model, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(**batch()).loss.backward()
    optimizer.step()
    assert prune.sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_bad_fractions_are_refused():
    with pytest.raises(MfkitError, match="fraction"):
        prune.global_magnitude_prune(tiny_bert(), 1.0)
    with pytest.raises(MfkitError, match="rounds"):
        prune.cubic_schedule(0.5, 0)
    with pytest.raises(MfkitError, match="BERT-style"):
        prune.encoder_layers(nn.Linear(2, 2))


# ------------------------------------------------------------------ structured


def test_removing_heads_and_neurons_equals_masking_them():
    model = tiny_bert()
    keep_heads = [torch.tensor([0, 2]), torch.tensor([1, 2, 3])]
    keep_neurons = [torch.tensor([0, 3, 5, 8, 13, 21]), torch.tensor([1, 2, 4, 9, 16, 23])]
    masked = prune.mask_units(
        copy.deepcopy(model),
        heads={0: [1, 3], 1: [0]},
        neurons={i: [j for j in range(24) if j not in k.tolist()] for i, k in enumerate(keep_neurons)},
    )
    removed = prune.remove_neurons(prune.remove_heads(copy.deepcopy(model), keep_heads), keep_neurons)
    layer = prune.encoder_layers(removed)[0]
    assert layer.attention.self.query.weight.shape == (8, 16)  # 2 heads of size 4
    assert layer.attention.output.dense.weight.shape == (16, 8)
    assert layer.intermediate.dense.weight.shape == (6, 16) and layer.output.dense.weight.shape == (16, 6)
    inputs = batch()
    torch.testing.assert_close(logits(removed, inputs), logits(masked, inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(removed, inputs), logits(model, inputs), atol=1e-4)
    assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in model.parameters())


def test_importance_has_one_score_per_unit_and_leaves_the_model_alone():
    model = tiny_bert()
    before = logits(model, batch())
    heads, neurons = prune.structure_importance(model, [batch(), batch(seed=2)])
    assert heads.shape == (2, 4) and neurons.shape == (2, 24)
    assert (heads >= 0).all() and heads.sum() > 0 and neurons.sum() > 0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    torch.testing.assert_close(logits(model, batch()), before)
    kept = prune.keep_top(neurons, 5)
    assert all(len(k) == 5 and k.tolist() == sorted(k.tolist()) for k in kept)
    assert set(kept[0].tolist()) == set(neurons[0].topk(5).indices.tolist())
    with pytest.raises(MfkitError, match="per layer"):
        prune.keep_top(neurons, 25)


def test_uneven_neuron_counts_are_refused():
    with pytest.raises(MfkitError, match="same number"):
        prune.remove_neurons(tiny_bert(), [torch.tensor([0, 1]), torch.tensor([0])])


def test_neuron_pruned_model_reloads_with_plain_transformers(tmp_path):
    model = prune.remove_neurons(tiny_bert(), [torch.arange(0, 24, 3), torch.arange(1, 24, 3)])
    prune.check_plain_config(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == 8
    torch.testing.assert_close(logits(reloaded, batch()), logits(model, batch()))


def test_head_pruned_model_is_refused_for_saving():
    model = prune.remove_heads(tiny_bert(), [torch.tensor([0, 1]), torch.arange(4)])
    with pytest.raises(MfkitError, match="pruned_heads"):
        prune.check_plain_config(model)
