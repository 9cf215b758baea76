"""Layer groups of a transformer, freezing, gradual unfreezing and discriminative (layer-wise) learning rates.

These are the pieces of multi-step fine-tuning (ULMFiT, Howard & Ruder 2018): train the new head first, then
unfreeze the pretrained layers one group at a time from the top down, each group with its own learning rate,
lr_l = lr_top * decay^(depth of l below the top), so the general features near the input move least.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import MfkitError
from .optim import parameter_groups
from .training import Callback, TrainState

BLOCK_LISTS = (
    "encoder.layer",
    "transformer.h",
    "model.layers",
    "h",
    "layers",
    "encoder.layers",
    "decoder.layers",
)


@dataclass(frozen=True)
class LayerGroup:
    """A named set of parameters that is frozen, unfrozen and given a learning rate together."""

    name: str
    parameter_names: tuple[str, ...]


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks, wherever the architecture keeps it."""
    base_name = model.base_model_prefix if hasattr(model, "base_model_prefix") else ""
    bases = [(base_name, getattr(model, base_name))] if base_name and hasattr(model, base_name) else []
    for prefix, base in [*bases, ("", model)]:
        for path in BLOCK_LISTS:
            module: Any = base
            for part in path.split("."):
                module = getattr(module, part, None)
                if module is None:
                    break
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                return (f"{prefix}.{path}" if prefix else path), module
    raise MfkitError(
        f"Could not find the transformer blocks of {type(model).__name__}.",
        f"pass a model whose blocks live under one of {BLOCK_LISTS}, or build the LayerGroups by hand.",
    )


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Groups from the input up: `embeddings`, `block 0` ... `block N-1`, then `head` (everything above the blocks:
    final norm, pooler, classifier). Every parameter belongs to exactly one group."""
    blocks_path, blocks = _find_blocks(model)
    names = [name for name, _ in model.named_parameters()]
    in_block = {i: tuple(n for n in names if n.startswith(f"{blocks_path}.{i}.")) for i in range(len(blocks))}
    block_params = {n for group in in_block.values() for n in group}
    others = [n for n in names if n not in block_params]
    embedding_words = ("embed", "wte", "wpe", "position", "token_type")
    embeddings = tuple(n for n in others if any(w in n for w in embedding_words))
    head = tuple(n for n in others if n not in embeddings)
    groups = [LayerGroup("embeddings", embeddings)]
    groups += [LayerGroup(f"block {i}", in_block[i]) for i in range(len(blocks))]
    groups.append(LayerGroup("head", head))
    return [g for g in groups if g.parameter_names]


def set_trainable(model: nn.Module, groups: list[LayerGroup], trainable: set[str]) -> None:
    """Make exactly the groups named in `trainable` trainable; freeze the rest."""
    chosen = {n for g in groups if g.name in trainable for n in g.parameter_names}
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def layerwise_lr(groups: list[LayerGroup], top_lr: float, decay: float) -> dict[str, float]:
    """Discriminative learning rates: the head gets `top_lr`, each group below gets `decay` times the one above."""
    if not 0 < decay <= 1:
        raise MfkitError(
            f"decay={decay} must be in (0, 1].", "use e.g. 1/2.6 (ULMFiT) or 0.8; 1 means one rate for all."
        )
    return {g.name: top_lr * decay ** (len(groups) - 1 - i) for i, g in enumerate(groups)}


def discriminative_param_groups(
    model: nn.Module, groups: list[LayerGroup], top_lr: float, decay: float, weight_decay: float
) -> list[dict]:
    """AdamW parameter groups with layer-wise learning rates, frozen layers included so they can be unfrozen later.

    Each returned group carries its `layer` name for plotting (in the order of `groups`, bottom to top).
    """
    rates = layerwise_lr(groups, top_lr, decay)
    layer_of = {n: g.name for g in groups for n in g.parameter_names}
    result = parameter_groups(
        model,
        weight_decay,
        top_lr,
        lr_for=lambda n: rates[layer_of[n]],
        include_frozen=True,
        group_of=layer_of.get,
    )
    order = {g.name: i for i, g in enumerate(groups)}
    return sorted(result, key=lambda g: (order[g["layer"]], g["weight_decay"]))


class GradualUnfreezing(Callback):
    """Train the head alone for `head_steps`, then unfreeze one more group from the top every `every` steps.

    Which groups are trainable is a pure function of the step, so a resumed run unfreezes exactly as an
    uninterrupted one. The optimizer must already hold the frozen parameters (see `discriminative_param_groups`
    or `parameter_groups(..., include_frozen=True)`). Not for DDP: DistributedDataParallel fixes the set of
    trainable parameters when it wraps the model, so under several processes it stops with an `MfkitError`.
    """

    def __init__(self, groups: list[LayerGroup], head_steps: int, every: int) -> None:
        if head_steps < 0 or every <= 0:
            raise MfkitError(
                f"head_steps={head_steps}, every={every}.", "use head_steps >= 0 and every >= 1."
            )
        self.groups = groups
        self.head_steps = head_steps
        self.every = every
        self.timeline: list[tuple[int, int]] = []  # (step, number of trainable groups) whenever it changes
        self._applied: int | None = (
            None  # what this process last set on the model (not saved: a resumed run reapplies)
        )

    def trainable_groups(self, step: int) -> int:
        """How many groups, counted from the top, are trainable at `step`."""
        if step < self.head_steps:
            return 1
        return min(len(self.groups), 2 + (step - self.head_steps) // self.every)

    def on_train_begin(self, state: TrainState) -> None:
        if state.accelerator.num_processes > 1:
            raise MfkitError(
                f"Gradual unfreezing cannot run on {state.accelerator.num_processes} processes: DDP fixes the set "
                "of trainable parameters when it wraps the model, and layers unfrozen later would never be "
                "synchronized across processes (each would train its own copy).",
                "run this strategy in one process (plain `python`/Jupyter, not `accelerate launch`), or train "
                "every layer from the start under DDP.",
            )

    def on_step_begin(self, state: TrainState) -> None:
        count = self.trainable_groups(state.step)
        if count != self._applied:
            model = state.accelerator.unwrap_model(state.model)
            set_trainable(model, self.groups, {g.name for g in self.groups[-count:]})
            self._applied = count
        if not self.timeline or self.timeline[-1][1] != count:
            self.timeline.append((state.step, count))

    def state_dict(self) -> dict[str, Any]:
        return {"timeline": list(self.timeline)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.timeline = [tuple(t) for t in state["timeline"]]
