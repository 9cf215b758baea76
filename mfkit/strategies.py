"""Fine-tuning strategies side by side: what trains when, at which rate, and what each run cost.

Multi-step fine-tuning (notebook 04) compares ways of training the same classifier on the same data, step budget
and seed: the head alone, everything at once, the head first and then one more layer group at a time, and that
again with layer-wise learning rates and a slanted triangular schedule. The pieces that make a strategy live in
`mfkit.layers` (groups, freezing, `GradualUnfreezing`, discriminative rates) and `mfkit.optim` (schedules);
this module runs one strategy through `fit`, watches how many parameters train at each step, scores the result
on the test split once, and lays the runs out as table rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .classify import Loaders, evaluate_classifier, predict, scores_of
from .layers import GradualUnfreezing, LayerGroup, count_parameters
from .training import Callback, EvalFn, History, TrainConfig, TrainState, fit


class TrainableCounter(Callback):
    """Records `(step, trainable parameters)` at the start of every step where the count changes.

    Put it after any callback that freezes or unfreezes layers, so it sees the step's final state.
    """

    def __init__(self) -> None:
        self.timeline: list[tuple[int, int]] = []

    def on_step_begin(self, state: TrainState) -> None:
        trainable, _ = count_parameters(state.accelerator.unwrap_model(state.model))
        if not self.timeline or self.timeline[-1][1] != trainable:
            self.timeline.append((state.step, trainable))

    def state_dict(self) -> dict[str, Any]:
        return {"timeline": list(self.timeline)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.timeline = [tuple(t) for t in state["timeline"]]


@dataclass
class StrategyRun:
    """One strategy's training history, its test scores, and how many parameters it trained when."""

    name: str
    history: History
    test: dict[str, float]  # `scores_of` on the test split: loss, accuracy, precision, recall, f1, macro_f1
    trainable: list[tuple[int, int]] = field(
        default_factory=list
    )  # (step, trainable parameters) at each change
    total_params: int = 0

    @property
    def trainable_start(self) -> int:
        """Trainable parameters at the first step."""
        return self.trainable[0][1] if self.trainable else 0

    @property
    def trainable_end(self) -> int:
        """Trainable parameters at the last step."""
        return self.trainable[-1][1] if self.trainable else 0

    def trainable_steps(self) -> tuple[list[int], list[int]]:
        """(steps, counts) of the trainable-parameter step function from step 0 to the last step, for `ax.step`."""
        steps = [s for s, _ in self.trainable] + [self.history.steps]
        counts = [c for _, c in self.trainable] + [self.trainable_end]
        return steps, counts

    def row(self) -> dict[str, Any]:
        """The run as one row of a results table."""
        return {
            "strategy": self.name,
            "trainable at start": self.trainable_start,
            "trainable at end": self.trainable_end,
            "test F1": self.test["f1"],
            "test accuracy": self.test["accuracy"],
            "best val F1": self.history.best_metric,
            "best step": self.history.best_step,
            "train seconds": self.history.seconds,
            "tokens/s": self.history.tokens_per_s,
        }


def run_strategy(
    name: str,
    model: nn.Module,
    loaders: Loaders,
    config: TrainConfig,
    *,
    param_groups: list[dict] | None = None,
    callbacks: Sequence[Callback] = (),
    eval_fn: EvalFn = evaluate_classifier,
    positive: int = 1,
) -> StrategyRun:
    """Train `model` with `fit` on `loaders.train`, evaluating on `loaders.validation`, then score it on
    `loaders.test` once.

    Freeze what should start frozen before calling (e.g. `set_trainable(model, groups, {"head"})`); `callbacks`
    (e.g. a `GradualUnfreezing`) may change it during training, and a `TrainableCounter` placed after them
    records the count at every change. With `config.restore_best`, the test scores are those of the best
    validation evaluation's weights.
    """
    counter = TrainableCounter()
    history = fit(
        model,
        loaders.train,
        config,
        eval_loader=loaders.validation,
        eval_fn=eval_fn,
        param_groups=param_groups,
        callbacks=[*callbacks, counter],
    )
    test = scores_of(predict(model, loaders.test), positive=positive)
    _, total = count_parameters(model)
    return StrategyRun(name=name, history=history, test=test, trainable=counter.timeline, total_params=total)


def group_sizes(model: nn.Module, groups: Sequence[LayerGroup]) -> dict[str, int]:
    """Number of parameters (elements) in each layer group, bottom to top."""
    sizes = dict(model.named_parameters())
    return {g.name: sum(sizes[n].numel() for n in g.parameter_names) for g in groups}


def unfreeze_steps(unfreezing: GradualUnfreezing) -> dict[str, int]:
    """The step at which each group starts training under `unfreezing` (the head at 0), bottom to top.

    The k-th group from the top (k >= 2) joins at `head_steps + (k - 2) * every`, the first step at which
    `unfreezing.trainable_groups(step) >= k`.
    """
    n = len(unfreezing.groups)
    steps = {}
    for i, group in enumerate(unfreezing.groups):
        k = n - i  # 1 for the head, n for the bottom group
        steps[group.name] = 0 if k == 1 else unfreezing.head_steps + (k - 2) * unfreezing.every
    return steps


def timeline_parameters(unfreezing: GradualUnfreezing, sizes: dict[str, int]) -> list[tuple[int, int]]:
    """`unfreezing.timeline` in parameters: (step, trainable parameters) at each step where a group joined.

    `sizes` maps group names to parameter counts (see `group_sizes`); the top `k` groups are the trainable ones.
    """
    return [
        (step, sum(sizes[g.name] for g in unfreezing.groups[-count:])) for step, count in unfreezing.timeline
    ]


def legend_names(param_groups: Sequence[dict]) -> list[str]:
    """Labels for `plot_learning_rates`: each optimizer group's `layer`, once per layer.

    `discriminative_param_groups` splits a layer into a decayed and an undecayed group with the same rate, so
    their lines coincide and the one drawn last is the one you see. That last group of each layer keeps the
    label; the others get matplotlib's hidden-label prefix "_", so the legend lists each layer once, in the
    colour of its visible line.
    """
    layers = [group.get("layer") or "all" for group in param_groups]
    last = {layer: i for i, layer in enumerate(layers)}
    return [layer if last[layer] == i else f"_{layer}" for i, layer in enumerate(layers)]
