"""Layer groups, freezing, gradual unfreezing and layer-wise learning rates."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.layers import (
    GradualUnfreezing,
    count_parameters,
    discriminative_param_groups,
    layer_groups,
    layerwise_lr,
    set_trainable,
)
from mfkit.loaders import make_loader, pad_collate
from mfkit.training import Callback, TrainConfig, fit


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def test_groups_cover_every_parameter_once():
    model = tiny_bert()
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["embeddings", "block 0", "block 1", "block 2", "head"]
    listed = [n for g in groups for n in g.parameter_names]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert any("classifier" in n for n in groups[-1].parameter_names)
    assert all(".layer.1." in n for n in groups[2].parameter_names)


def test_groups_of_a_decoder():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    assert [g.name for g in layer_groups(model)] == ["embeddings", "block 0", "block 1", "head"]


def test_unknown_architecture_raises():
    with pytest.raises(MfkitError, match="transformer blocks"):
        layer_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_set_trainable_and_count():
    model = tiny_bert()
    groups = layer_groups(model)
    set_trainable(model, groups, {"head"})
    trainable, total = count_parameters(model)
    head = sum(p.numel() for n, p in model.named_parameters() if n in groups[-1].parameter_names)
    assert trainable == head and total > trainable


def test_layerwise_lr_decays_downwards():
    groups = layer_groups(tiny_bert())
    rates = layerwise_lr(groups, 1e-3, 0.5)
    assert (
        rates["head"] == 1e-3 and rates["block 2"] == 5e-4 and rates["embeddings"] == pytest.approx(1e-3 / 16)
    )
    with pytest.raises(MfkitError):
        layerwise_lr(groups, 1e-3, 1.5)


def test_discriminative_groups_keep_layers_apart_even_with_equal_rates():
    model = tiny_bert()
    groups = layer_groups(model)
    result = discriminative_param_groups(model, groups, 1e-3, 1.0, 0.01)
    assert [g["layer"] for g in result][::2] == [g.name for g in groups]
    assert {g["weight_decay"] for g in result} == {0.0, 0.01}


def test_unfreezing_schedule_is_a_function_of_the_step():
    schedule = GradualUnfreezing(layer_groups(tiny_bert()), head_steps=4, every=2)
    assert [schedule.trainable_groups(s) for s in range(12)] == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_gradual_unfreezing_trains_only_unfrozen_groups():
    seed_everything(0)
    model = tiny_bert()
    groups = layer_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": [1, 2 + i % 5, 3], "attention_mask": [1, 1, 1], "labels": i % 2} for i in range(64)]
    loader = make_loader(rows, 8, pad_collate(0), seed=0)
    seen: list[int] = []

    class Watch(Callback):
        def on_step_end(self, state) -> None:
            seen.append(count_parameters(state.model)[0])

    unfreeze = GradualUnfreezing(groups, head_steps=3, every=3)
    fit(
        model,
        loader,
        TrainConfig(max_steps=6, lr=1e-2, warmup=0, progress=False),
        param_groups=discriminative_param_groups(model, groups, 1e-2, 0.5, 0.0),
        callbacks=[unfreeze, Watch()],
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(groups[-1].parameter_names) | set(groups[-2].parameter_names)
    assert seen[0] < seen[-1]
    assert unfreeze.timeline == [(0, 1), (3, 2)]


def test_gradual_unfreezing_refuses_several_processes():
    """Under DDP, layers frozen when the model was wrapped would never be synchronized after unfreezing."""
    model = tiny_bert()
    unfreezing = GradualUnfreezing(layer_groups(model), head_steps=1, every=1)
    state = type(
        "State", (), {"accelerator": type("Accelerator", (), {"num_processes": 2})(), "model": model}
    )()
    with pytest.raises(MfkitError, match="2 processes") as err:
        unfreezing.on_train_begin(state)
    assert "one process" in str(err.value)
    state.accelerator.num_processes = 1
    unfreezing.on_train_begin(state)  # one process: fine
