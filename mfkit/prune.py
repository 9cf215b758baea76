"""Pruning a transformer classifier: zero the smallest weights (unstructured), or cut whole heads and neurons.

Two kinds of pruning, with very different effects on the cost of a prediction:

    global_magnitude_prune(model, s)   mask the fraction s of encoder Linear weights with the smallest |w|
                                       (torch.nn.utils.prune, one threshold over all layers); the matrices
                                       keep their shape, so a dense CPU matmul does the same work
    prune_retrain(model, s, rounds, ..)  one-shot (rounds=1) or iterative prune -> retrain at one step budget
    structure_importance(model, loader)  |dL/d gate| of every attention head and FFN neuron (Michel et al., 2019)
    remove_heads / remove_neurons      build smaller Linear layers without those rows/columns: less work

Only the FFN width can be written into a plain transformers config (`intermediate_size`, one value for every
layer); transformers 5 dropped `prune_heads` and `config.pruned_heads`, and BERT's head size is fixed at
hidden_size / num_attention_heads, so a model with removed heads runs in memory but cannot be saved as a plain
`from_pretrained` folder (`check_plain_config` says so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from .errors import MfkitError

# --------------------------------------------------------------------------------------------------------------
# Where the prunable weights are
# --------------------------------------------------------------------------------------------------------------


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-style model (`model.base_model.encoder.layer`)."""
    layers = getattr(getattr(getattr(model, "base_model", model), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "intermediate"):
        raise MfkitError(
            f"{type(model).__name__} has no BERT-style encoder.layer list with attention and FFN blocks.",
            "pass a BERT-family classifier, e.g. notebook 03's MiniLM (classify.load_baseline).",
        )
    return layers


def encoder_linears(model: nn.Module) -> list[tuple[nn.Linear, str]]:
    """(module, "weight") of every Linear inside the encoder blocks: the weights magnitude pruning ranks."""
    return [(m, "weight") for m in encoder_layers(model).modules() if isinstance(m, nn.Linear)]


def sparsity(model: nn.Module) -> float:
    """The fraction of encoder Linear weights that are exactly zero (masked or removed-mask alike)."""
    zeros = total = 0
    for module, name in encoder_linears(model):
        weight = getattr(module, name)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total


# --------------------------------------------------------------------------------------------------------------
# Unstructured: global magnitude pruning
# --------------------------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise MfkitError(f"{name}={value!r} is not a fraction in [0, 1).", f"pass {name} as e.g. 0.5.")


def global_magnitude_prune(model: nn.Module, target: float) -> float:
    """Mask encoder Linear weights until the fraction `target` of them is zero; returns the sparsity reached.

    One threshold over all layers (global L1 magnitude, `prune.global_unstructured`): the weights with the
    smallest |w| anywhere go first. Called again with a larger `target`, it prunes only the difference among
    the weights still alive (the masks accumulate), which is what iterative pruning needs. The masks stay on
    the model (`weight = weight_orig * weight_mask`), so retraining cannot revive a pruned weight.
    """
    _check_fraction("target", target)
    params = encoder_linears(model)
    total = sum(getattr(m, n).numel() for m, n in params)
    already = sum(int((m.weight_mask == 0).sum()) for m, _ in params if hasattr(m, "weight_mask"))
    more = max(0, round(target * total) - already)
    if more:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=more)
    return sparsity(model)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight (`prune.remove`): plain dense tensors holding zeros."""
    for module, name in encoder_linears(model):
        if prune.is_pruned(module) and hasattr(module, f"{name}_mask"):
            prune.remove(module, name)
    return model


def cubic_schedule(target: float, rounds: int) -> list[float]:
    """Sparsity after each of `rounds` prune steps: s_k = s (1 - (1 - k/n)^3) (Zhu & Gupta, 2017).

    Large steps first, while many redundant weights remain; small ones near the end. One round is one-shot.
    """
    _check_fraction("target", target)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise MfkitError(
            f"rounds={rounds!r} is not a whole number >= 1.", "pass rounds=1 (one-shot) or more."
        )
    return [target * (1 - (1 - k / rounds) ** 3) for k in range(1, rounds + 1)]


def prune_retrain(
    model: nn.Module,
    target: float,
    rounds: int,
    steps: int,
    retrain: Callable[[nn.Module, int], Any],
) -> list[float]:
    """Prune to `target` in `rounds` steps of `cubic_schedule`, calling `retrain(model, n)` after each.

    The `steps` are shared evenly (the first rounds take any remainder), so one-shot (`rounds=1`) and iterative
    runs cost the same. Returns the sparsity reached after each round; a round left with no step only prunes.
    """
    reached = []
    share, extra = divmod(steps, rounds)
    for k, level in enumerate(cubic_schedule(target, rounds)):
        reached.append(global_magnitude_prune(model, level))
        n = share + (k < extra)
        if n:
            retrain(model, n)
    return reached


# --------------------------------------------------------------------------------------------------------------
# Structured: which heads and neurons matter
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _gates(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Gates of ones on every head's output and every FFN neuron, as inputs of W_O and W_2 (forward pre-hooks)."""
    layers = encoder_layers(model)
    device = next(model.parameters()).device
    attn = layers[0].attention.self
    heads = torch.ones(len(layers), attn.num_attention_heads, device=device, requires_grad=True)
    neurons = torch.ones(
        len(layers), layers[0].intermediate.dense.out_features, device=device, requires_grad=True
    )

    def gate_heads(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            split = x.view(*x.shape[:-1], heads.shape[1], -1) * heads[i][:, None]
            return (split.view_as(x), *args[1:])

        return hook

    def gate_neurons(i: int) -> Callable:
        return lambda module, args: (args[0] * neurons[i], *args[1:])

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.attention.output.dense.register_forward_pre_hook(gate_heads(i)))
        handles.append(layer.output.dense.register_forward_pre_hook(gate_neurons(i)))
    try:
        yield heads, neurons
    finally:
        for handle in handles:
            handle.remove()


def structure_importance(
    model: nn.Module, loader: DataLoader, max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of every head [layers, heads] and FFN neuron [layers, width]: sum over batches of |dL/d gate|.

    Each head's output (and each neuron's activation) is multiplied by a gate g = 1; dL/dg is the first-order
    change of the loss if the unit were removed (Michel et al., 2019, for heads; the same for neurons). The
    absolute value is taken per batch. The weights get no gradients here and the model is left unchanged.
    """
    was_training = model.training
    model.eval()  # no dropout: the importance of the model as it predicts
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    try:
        with _gates(model) as (heads, neurons):
            head_score, neuron_score = torch.zeros_like(heads), torch.zeros_like(neurons)
            for b, batch in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                if loss is None:
                    raise MfkitError("The model returned no loss.", "use a loader whose batches hold labels.")
                g_heads, g_neurons = torch.autograd.grad(loss, (heads, neurons))
                head_score += g_heads.abs()
                neuron_score += g_neurons.abs()
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return head_score.detach().cpu(), neuron_score.detach().cpu()


def keep_top(importance: torch.Tensor, keep: int) -> list[torch.Tensor]:
    """For each row (layer), the indices of its `keep` most important units, in increasing order."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= importance.shape[1]:
        raise MfkitError(
            f"keep={keep!r} units per layer, but a layer has {importance.shape[1]}.",
            f"keep between 1 and {importance.shape[1]} per layer.",
        )
    return [row.topk(keep).indices.sort().values for row in importance]


# --------------------------------------------------------------------------------------------------------------
# Structured: removing them
# --------------------------------------------------------------------------------------------------------------


def _shrink(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the output rows (dim=0, with their biases) or input columns (dim=1) `index`."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.data.copy_(bias.index_select(0, index) if dim == 0 else bias)
    return new


def remove_heads(model: nn.Module, keep: Sequence[torch.Tensor]) -> nn.Module:
    """Keep only the heads `keep[l]` of layer l: rows of W_Q, W_K, W_V (and biases), columns of W_O.

    Head h owns rows h*d .. (h+1)*d - 1 of the query, key and value projections (d the head size) and the same
    columns of the output projection, so removing those gives exactly the model whose removed heads output zero.
    The model works in memory; its config still says the old head count (see `check_plain_config`).
    """
    layers = encoder_layers(model)
    if len(keep) != len(layers):
        raise MfkitError(f"keep has {len(keep)} entries for {len(layers)} layers.", "give one per layer.")
    for layer, heads in zip(layers, keep, strict=True):
        attn = layer.attention.self
        size = attn.attention_head_size
        rows = (torch.as_tensor(heads)[:, None] * size + torch.arange(size)).flatten()
        for name in ("query", "key", "value"):
            setattr(attn, name, _shrink(getattr(attn, name), rows, 0))
        layer.attention.output.dense = _shrink(layer.attention.output.dense, rows, 1)
        attn.num_attention_heads = len(heads)
        attn.all_head_size = len(heads) * size
    return model


def remove_neurons(model: nn.Module, keep: Sequence[torch.Tensor]) -> nn.Module:
    """Keep only the FFN neurons `keep[l]` of layer l: rows of W_1 and b_1, columns of W_2.

    Every layer must keep the same number, so `config.intermediate_size` (one value for all layers) is updated
    and the model saves and reloads as a plain transformers folder.
    """
    layers = encoder_layers(model)
    counts = {len(k) for k in keep}
    if len(keep) != len(layers) or len(counts) != 1:
        raise MfkitError(
            f"keep gives {sorted(counts)} neurons for {len(keep)} of {len(layers)} layers.",
            "keep the same number of neurons in every layer (keep_top does), one entry per layer.",
        )
    for layer, index in zip(layers, keep, strict=True):
        index = torch.as_tensor(index)
        layer.intermediate.dense = _shrink(layer.intermediate.dense, index, 0)
        layer.output.dense = _shrink(layer.output.dense, index, 1)
    model.config.intermediate_size = counts.pop()
    return model


def mask_units(
    model: nn.Module,
    heads: Mapping[int, Sequence[int]] | None = None,
    neurons: Mapping[int, Sequence[int]] | None = None,
) -> nn.Module:
    """Zero, in place, W_O's columns of the `heads[l]` and W_2's columns of the `neurons[l]` of layer l.

    The masked model computes what the model with those units removed computes (the tests check this).
    """
    layers = encoder_layers(model)
    with torch.no_grad():
        for i, hs in (heads or {}).items():
            size = layers[i].attention.self.attention_head_size
            for h in hs:
                layers[i].attention.output.dense.weight[:, h * size : (h + 1) * size] = 0
        for i, ns in (neurons or {}).items():
            layers[i].output.dense.weight[:, list(ns)] = 0
    return model


def check_plain_config(model: nn.Module) -> None:
    """Raise `MfkitError` when the model's shapes no longer follow its config (removed heads)."""
    config = model.config
    for i, layer in enumerate(encoder_layers(model)):
        if layer.attention.self.query.out_features != config.hidden_size:
            raise MfkitError(
                f"layer {i} has {layer.attention.self.num_attention_heads} of {config.num_attention_heads} "
                "attention heads; transformers 5 has no pruned_heads, so from_pretrained would not reload it.",
                "save a model whose heads were kept (remove only FFN neurons), or keep this one in memory.",
            )
        if layer.intermediate.dense.out_features != config.intermediate_size:
            raise MfkitError(
                f"layer {i} has {layer.intermediate.dense.out_features} FFN neurons, the config says "
                f"{config.intermediate_size}.",
                "remove neurons with remove_neurons, which keeps one width for every layer.",
            )


# --------------------------------------------------------------------------------------------------------------
# Combined with int8
# --------------------------------------------------------------------------------------------------------------
