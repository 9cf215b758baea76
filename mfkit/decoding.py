"""Decoding: how a causal LM's next-token distribution becomes text, and how to measure the text it gives.

The strategies are `generate` settings (transformers implements every one of them); this module names them,
shows the distribution each one samples from (with transformers' own logits processors, so the picture is what
`generate` does), generates batches with left padding, and scores the results: distinct-n (Li et al., 2016),
the share of repeated n-grams, the perplexity of a continuation under the model, and tokens per second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import MfkitError, check_choice, check_positive
from .lm import eos_id
from .timing import synchronize

# Sampling switches every filter off unless the strategy sets it: a model's own generation_config may carry
# defaults (e.g. top_k=50) that would otherwise apply silently.
_SAMPLE = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False},
    "beam 4": {"do_sample": False, "num_beams": 4},
    "greedy + repetition penalty 1.3": {"do_sample": False, "repetition_penalty": 1.3},
    "greedy + no repeated 3-grams": {"do_sample": False, "no_repeat_ngram_size": 3},
    "pure sampling": dict(_SAMPLE),
    "temperature 0.7": {**_SAMPLE, "temperature": 0.7},
    "top-k 40": {**_SAMPLE, "top_k": 40},
    "top-p 0.9": {**_SAMPLE, "top_p": 0.9},
}


def strategy(name: str) -> dict[str, Any]:
    """The `generate` keyword arguments of strategy `name` (a copy)."""
    check_choice("strategy", name, tuple(STRATEGIES))
    return dict(STRATEGIES[name])


def sampling_settings(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict[str, Any]:
    """`generate` arguments for sampling with these filters (temperature 0 means greedy)."""
    if temperature == 0:
        return {"do_sample": False}
    check_positive("temperature", temperature)
    if not 0 < top_p <= 1:
        raise MfkitError(f"top_p={top_p!r} must be in (0, 1].", "pass e.g. top_p=0.9 (1 switches it off).")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise MfkitError(
            f"top_k={top_k!r} must be a whole number, 0 or more.", "pass e.g. top_k=40 (0: off)."
        )
    return {**_SAMPLE, "temperature": float(temperature), "top_k": top_k, "top_p": float(top_p)}


def _processors(
    temperature: float, top_k: int, top_p: float, repetition_penalty: float, no_repeat_ngram: int
) -> LogitsProcessorList:
    """transformers' processors in the order `generate` applies them: penalties first, then the warpers."""
    steps: list[Any] = []
    if repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram > 0:
        steps.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram))
    if temperature != 1.0:
        steps.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        steps.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        steps.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(steps)


@torch.no_grad()
def next_token_distribution(
    model: nn.Module,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
) -> torch.Tensor:
    """The probabilities the next token is sampled from after `input_ids` (1-D), reshaped by the given filters.

    Filtered tokens get probability exactly 0; the rest are renormalised, as `generate` does before sampling.
    """
    check_positive("temperature", temperature)
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    logits = model(input_ids=ids).logits[:, -1, :].float()
    logits = _processors(temperature, top_k, top_p, repetition_penalty, no_repeat_ngram)(ids, logits)
    return torch.softmax(logits, dim=-1)[0].cpu()


def entropy_bits(probs: torch.Tensor) -> float:
    """Shannon entropy of a distribution in bits (zero-probability tokens contribute nothing)."""
    p = probs[probs > 0].double()
    return float(-(p * p.log2()).sum())


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def encode_left_padded(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompts as one batch padded on the left, so every row's last position is its last prompt token.

    `generate` appends each new token at the right end of the row; with right padding the pads would sit
    between a short prompt and its continuation.
    """
    if not prompts:
        raise MfkitError("no prompts to continue.", "pass at least one prompt.")
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] or [eos_id(tokenizer)] for p in prompts]
    width = max(len(r) for r in rows)
    pad = _pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _cut_at_eos(ids: Sequence[int], eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    settings: Mapping[str, Any],
    seed: int | None = 0,
    min_new_tokens: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new token ids of each prompt (cut at end-of-text), all prompts in one left-padded batch."""
    check_positive("max_new_tokens", max_new_tokens)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in encode_left_padded(tokenizer, prompts).items()}
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if context is not None and batch["input_ids"].shape[1] + max_new_tokens > context:
        raise MfkitError(
            f"the longest prompt ({batch['input_ids'].shape[1]} tokens) plus max_new_tokens={max_new_tokens} "
            f"exceed the model's context of {context} tokens.",
            "ask for fewer new tokens or use shorter prompts.",
        )
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=_pad_id(tokenizer),
            eos_token_id=eos_id(tokenizer),
            use_cache=use_cache,
            **settings,
        )
    finally:
        model.train(was_training)
    start = batch["input_ids"].shape[1]
    return [_cut_at_eos(row[start:].tolist(), eos_id(tokenizer)) for row in out]


def ngrams(tokens: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    """The n-grams of one sequence, in order."""
    check_positive("n", n)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[Any]], n: int) -> float:
    """Distinct n-grams over all n-grams of all sequences (Li et al., 2016); nan when there are none."""
    grams = [g for s in sequences for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated_ngram_share(tokens: Sequence[Any], n: int) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it (0: no repetition); nan if too short."""
    grams = ngrams(tokens, n)
    if not grams:
        return math.nan
    seen: set[tuple[Any, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


@torch.no_grad()
def continuation_perplexity(model: nn.Module, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of `new_ids` given `prompt_ids` under `model`; nan when `new_ids` is empty."""
    if not new_ids:
        return math.nan
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(new_ids)], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids) :])
    return float(torch.exp(nll))


@dataclass(frozen=True)
class TextScores:
    """Diversity and degeneration of a set of continuations."""

    distinct_1: float
    distinct_2: float
    repeated_4gram_share: float
    perplexity: float
    mean_tokens: float


def score_continuations(
    model: nn.Module, prompts_ids: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> TextScores:
    """Distinct-1/2 over all continuations, mean repeated-4-gram share, and median perplexity under `model`."""
    if len(prompts_ids) != len(continuations):
        raise MfkitError("one prompt per continuation is needed.", "pass lists of the same length.")
    repeats = [r for c in continuations if not math.isnan(r := repeated_ngram_share(c, 4))]
    ppl = [
        p
        for pr, c in zip(prompts_ids, continuations, strict=True)
        if not math.isnan(p := continuation_perplexity(model, pr, c))
    ]
    return TextScores(
        distinct_1=distinct_n(continuations, 1),
        distinct_2=distinct_n(continuations, 2),
        repeated_4gram_share=sum(repeats) / len(repeats) if repeats else math.nan,
        perplexity=float(torch.tensor(ppl).median()) if ppl else math.nan,
        mean_tokens=sum(len(c) for c in continuations) / len(continuations),
    )


def tokens_per_second(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    new_tokens: int,
    use_cache: bool = True,
    repeats: int = 3,
) -> float:
    """New tokens per second of greedy generation of exactly `new_tokens` per prompt (median of `repeats`)."""
    device = next(model.parameters()).device
    generate_batch(model, tokenizer, prompts, 2, {"do_sample": False}, min_new_tokens=2, use_cache=use_cache)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = generate_batch(
            model,
            tokenizer,
            prompts,
            new_tokens,
            {"do_sample": False},
            min_new_tokens=new_tokens,
            use_cache=use_cache,
        )
        synchronize(device)
        rates.append(sum(len(o) for o in out) / (time.perf_counter() - start))
    return float(torch.tensor(rates).median())
