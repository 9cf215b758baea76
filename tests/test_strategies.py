"""Strategy runs: trainable-parameter bookkeeping, unfreezing steps, the results row, legend names (seconds)."""

from __future__ import annotations

import pytest
from transformers import BertConfig, BertForSequenceClassification

from mfkit.classify import Loaders
from mfkit.env import seed_everything
from mfkit.layers import (
    GradualUnfreezing,
    count_parameters,
    discriminative_param_groups,
    layer_groups,
    set_trainable,
)
from mfkit.loaders import make_loader, pad_collate
from mfkit.strategies import (
    StrategyRun,
    group_sizes,
    legend_names,
    run_strategy,
    timeline_parameters,
    unfreeze_steps,
)
from mfkit.training import History, TrainConfig


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


def tiny_loaders() -> Loaders:
    """Label 1 exactly when token 5 appears: learnable in a few steps."""
    rows = [
        {"input_ids": [1, 2 + i % 7, 3], "attention_mask": [1, 1, 1], "labels": int(2 + i % 7 == 5)}
        for i in range(56)
    ]
    collate = pad_collate(0)
    return Loaders(
        train=make_loader(rows, 8, collate, seed=0),
        validation=make_loader(rows[:14], 14, collate, shuffle=False),
        test=make_loader(rows[14:28], 14, collate, shuffle=False),
    )


def config(steps: int = 8, **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "max_steps": steps,
            "lr": 1e-2,
            "warmup": 0,
            "eval_every": 4,
            "monitor": "eval_f1",
            "mode": "max",
            "log_every": 2,
            "progress": False,
            **overrides,
        }
    )


def test_group_sizes_add_up_to_the_model():
    model = tiny_bert()
    sizes = group_sizes(model, layer_groups(model))
    assert list(sizes) == ["embeddings", "block 0", "block 1", "block 2", "head"]
    assert sum(sizes.values()) == count_parameters(model)[1]


def test_unfreeze_steps_agree_with_the_schedule():
    unfreezing = GradualUnfreezing(layer_groups(tiny_bert()), head_steps=4, every=3)
    steps = unfreeze_steps(unfreezing)
    assert steps == {"head": 0, "block 2": 4, "block 1": 7, "block 0": 10, "embeddings": 13}
    n = len(unfreezing.groups)
    for i, group in enumerate(unfreezing.groups):
        first = next(s for s in range(100) if unfreezing.trainable_groups(s) >= n - i)
        assert steps[group.name] == first


def test_full_run_counts_every_parameter_and_fills_the_row():
    seed_everything(0)
    model = tiny_bert()
    run = run_strategy("full", model, tiny_loaders(), config())
    total = count_parameters(model)[1]
    assert run.trainable == [(0, total)]
    assert run.trainable_start == run.trainable_end == run.total_params == total
    assert set(run.test) >= {"f1", "accuracy", "loss"}
    row = run.row()
    assert row["strategy"] == "full" and row["trainable at start"] == total
    assert row["train seconds"] == run.history.seconds > 0
    assert run.trainable_steps() == ([0, 8], [total, total])


def test_gradual_run_counter_matches_the_unfreezing_timeline():
    seed_everything(0)
    model = tiny_bert()
    groups = layer_groups(model)
    set_trainable(model, groups, {"head"})
    unfreezing = GradualUnfreezing(groups, head_steps=2, every=2)
    param_groups = discriminative_param_groups(model, groups, 1e-2, 0.5, 0.0)
    run = run_strategy(
        "gradual", model, tiny_loaders(), config(10), param_groups=param_groups, callbacks=[unfreezing]
    )
    sizes = group_sizes(model, groups)
    assert run.trainable == timeline_parameters(unfreezing, sizes)
    assert run.trainable_start == sizes["head"]
    assert run.trainable_end == count_parameters(model)[1]
    assert [s for s, _ in run.trainable] == [0, 2, 4, 6, 8]


def test_same_seed_same_result():
    results = []
    for _ in range(2):
        seed_everything(0)
        results.append(run_strategy("full", tiny_bert(), tiny_loaders(), config()).test)
    assert results[0] == pytest.approx(results[1])


def test_legend_names_hide_repeated_layers():
    model = tiny_bert()
    groups = layer_groups(model)
    param_groups = discriminative_param_groups(model, groups, 1e-3, 0.5, 0.01)
    names = legend_names(param_groups)
    assert [n for n in names if not n.startswith("_")] == [g.name for g in groups]
    assert len(names) == len(param_groups)
    shown = [i for i, n in enumerate(names) if not n.startswith("_")]
    assert all(param_groups[i + 1]["layer"] != names[i] for i in shown if i + 1 < len(param_groups))
    assert legend_names([{"params": []}]) == ["all"]


def test_empty_run_has_zero_counts():
    run = StrategyRun("none", History(), {"f1": 0.0, "accuracy": 0.0})
    assert run.trainable_start == run.trainable_end == 0
