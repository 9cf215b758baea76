"""Pretraining a tiny GPT from scratch: model config, packed blocks, loaders, samples, saving, a unigram baseline.

Causal language modelling trains a decoder to predict every next token of running text. The data side is
"packing": tokenize each paragraph, join them into one long token stream with an end-of-text token between
paragraphs, and cut the stream into fixed-length blocks. Every block is then a full training example: no padding,
no wasted positions. The block's `labels` are its `input_ids` unchanged, because a transformers causal-LM model
shifts them itself (position t is scored on token t+1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from . import checkpoint
from .errors import MfkitError, check_positive
from .loaders import make_loader
from .metrics import UnigramLM, token_nll
from .paths import artifacts_dir, atomic_folder

MODEL_NAME = "tiny-gpt"
CHECKPOINT_GROUP = "02"


# --------------------------------------------------------------------------------------------------------------
# The model


def tiny_gpt_config(
    vocab_size: int,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    block_size: int = 128,
    dropout: float = 0.1,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GPT2Config:
    """A GPT-2 configuration at toy scale.

    The input embedding and the output projection share one matrix (`tie_word_embeddings`): for a small model
    the vocabulary matrix is a large share of all parameters, and tying it halves that share. `block_size` is
    the context length, i.e. the number of learned position embeddings: the model cannot see further back.
    The activation is GPT-2's tanh approximation of GELU, computed by PyTorch's fused kernel
    (`gelu_pytorch_tanh`) instead of GPT-2's default of four separate tensor operations: same function, fewer
    passes over memory (about 5% of a CPU training step).
    """
    for name, value in (
        ("vocab_size", vocab_size),
        ("n_layer", n_layer),
        ("n_embd", n_embd),
        ("n_head", n_head),
        ("block_size", block_size),
    ):
        check_positive(name, value)
    if n_embd % n_head:
        raise MfkitError(
            f"n_embd={n_embd} is not divisible by n_head={n_head}.",
            "pick sizes where each head gets n_embd / n_head dimensions (e.g. 128 wide, 4 heads).",
        )
    if not 0 <= dropout < 1:
        raise MfkitError(f"dropout={dropout} is outside [0, 1).", "use a small rate such as 0.0-0.2.")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        activation_function="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=bos_token_id if bos_token_id is not None else eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
    )


def build_tiny_gpt(config: GPT2Config) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 language model (random weights: it knows nothing yet)."""
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


# --------------------------------------------------------------------------------------------------------------
# The data: one token stream, cut into blocks


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-text id, which separates paragraphs in the stream (error if it has none)."""
    token_id = getattr(tokenizer, "eos_token_id", None)
    if token_id is None:
        raise MfkitError(
            "The tokenizer has no end-of-text (eos) token, so paragraphs cannot be separated.",
            "use the tokenizer notebook 01 trains (it defines one), or set tokenizer.eos_token to a special token.",
        )
    return int(token_id)


def token_stream(texts: Iterable[str], tokenizer: Any, batch_size: int = 1000) -> np.ndarray:
    """Tokenize `texts` and join them into one stream: t(text_1) eos t(text_2) eos ... t(text_n) eos.

    The eos token after each paragraph tells the model where one ends, so it also learns to stop.
    """
    sep = eos_id(tokenizer)
    texts = list(texts)
    pieces: list[int] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.extend(ids)
            pieces.append(sep)
    return np.asarray(pieces, dtype=np.int64)


def pack_blocks(texts: Iterable[str], tokenizer: Any, block_size: int) -> Dataset:
    """The token stream of `texts` cut into consecutive, non-overlapping blocks of `block_size` tokens.

    Returns a `datasets.Dataset` with `input_ids` and `labels` (identical lists: GPT-2 shifts the labels
    internally, so position t is trained to predict token t+1). The last partial block is dropped.
    """
    check_positive("block_size", block_size)
    stream = token_stream(texts, tokenizer)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise MfkitError(
            f"The texts give only {len(stream)} tokens, fewer than one block of {block_size}.",
            "pass more text or a smaller block_size.",
        )
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def block_collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks into a batch of `input_ids` and `labels`, with no attention mask.

    Every position of a packed block is real text (end-of-text tokens inside a block are separators, not padding),
    so there is nothing to mask; and an all-ones mask is not free: transformers checks it on the host before each
    forward, which costs a GPU-to-host synchronization every step.
    """
    return {
        "input_ids": torch.tensor([row["input_ids"] for row in rows]),
        "labels": torch.tensor([row["labels"] for row in rows]),
    }


def lm_loaders(
    blocks: Mapping[str, Dataset],
    batch_size: int,
    seed: int = 0,
    eval_batches: int | None = None,
) -> dict[str, DataLoader]:
    """Loaders over packed blocks: `train` reshuffled every epoch, `validation` and `test` in order.

    `eval_batches` caps the validation loader used for periodic evaluation during training (blocks spread
    evenly over the split, so every book is represented); `test` is never capped.
    """
    collate = block_collate
    loaders: dict[str, DataLoader] = {}
    for split, data in blocks.items():
        if split == "validation" and eval_batches is not None and eval_batches * batch_size < len(data):
            picked = np.linspace(0, len(data) - 1, eval_batches * batch_size).round().astype(int)
            data = data.select(sorted(set(picked.tolist())))
        loaders[split] = make_loader(data, batch_size, collate, shuffle=split == "train", seed=seed)
    return loaders


def run_folder(knobs: Mapping[str, Any], artifacts: str | Path | None = None, tokenizer: Any = None) -> Path:
    """`ARTIFACTS_DIR/checkpoints/02/<hash>` (`checkpoint.run_folder`): the hash covers `knobs` and, when given,
    the tokenizer's vocabulary and merges, so a retrained tokenizer starts afresh too."""
    extra = ""
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        extra = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return checkpoint.run_folder(CHECKPOINT_GROUP, knobs, artifacts, extra)


# --------------------------------------------------------------------------------------------------------------
# Samples


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    seed: int | None = 0,
    **sampling: Any,
) -> list[str]:
    """Continue each prompt with `model.generate` and return the new text only (one string per prompt).

    `sampling` passes straight to `generate` (`do_sample=True, temperature=0.8, top_p=0.95`, ...); without it
    decoding is greedy. `seed` makes sampled continuations repeatable. Prompts run one by one, so no padding
    is involved; the continuation stops at end-of-text or after `max_new_tokens`.
    """
    check_positive("max_new_tokens", max_new_tokens)
    device = next(model.parameters()).device
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    was_training = model.training
    model.eval()
    if seed is not None:  # once, before all prompts, so each prompt draws its own random numbers
        torch.manual_seed(seed)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:  # an empty prompt starts from end-of-text, i.e. "the start of a paragraph"
            ids = torch.tensor([[eos_id(tokenizer)]])
        if context is not None and ids.shape[1] + max_new_tokens > context:
            raise MfkitError(
                f"The prompt ({ids.shape[1]} tokens) plus max_new_tokens={max_new_tokens} exceed the model's "
                f"context of {context} tokens.",
                f"ask for at most {max(0, context - ids.shape[1])} new tokens, or use a shorter prompt.",
            )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer),
            eos_token_id=eos_id(tokenizer),
            **{"do_sample": False, **sampling},
        )
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    model.train(was_training)
    return outputs


# --------------------------------------------------------------------------------------------------------------
# Saving


def save_tiny_gpt(
    model: nn.Module, tokenizer: Any, artifacts: str | Path | None = None, name: str = MODEL_NAME
) -> Path:
    """Save model + tokenizer to `ARTIFACTS_DIR/models/<name>` in one rename, so `load_model(name)` finds them.

    Everything is written to a temporary folder beside the target first; a crash half-way leaves the previous
    model (or nothing), never a half-written folder that a later notebook would load. Under `accelerate launch`,
    call it on every process: the main one's folder is the one put in place (see `paths.atomic_folder`).
    """
    target = artifacts_dir(artifacts) / "models" / name
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


# --------------------------------------------------------------------------------------------------------------
# The unigram floor


def predicted_tokens(loader: DataLoader) -> list[int]:
    """The tokens a causal LM is scored on over `loader`: every label but the first of each row, -100 skipped.

    These are exactly the targets `mfkit.metrics.token_nll` scores, so a baseline scored on them is compared
    on the very same tokens.
    """
    tokens: list[int] = []
    for batch in loader:
        labels = batch.get("labels", batch["input_ids"])[:, 1:]
        tokens.extend(labels[labels != -100].tolist())
    return tokens


def unigram_perplexity(
    train_ids: Iterable[int], loader: DataLoader, vocab_size: int, smoothing: float = 1.0
) -> tuple[float, int]:
    """Perplexity of a unigram model fitted on `train_ids`, on the tokens `loader` makes a causal LM predict.

    Returns (perplexity, number of tokens scored).
    """
    targets = predicted_tokens(loader)
    unigram = UnigramLM(vocab_size, smoothing).fit(int(t) for t in train_ids)
    return unigram.perplexity(targets), len(targets)


def compare_with_unigram(
    model: nn.Module, loader: DataLoader, train_ids: Iterable[int], vocab_size: int
) -> dict[str, float]:
    """Model and unigram perplexity on the same predicted tokens of `loader` (checked to be the same count)."""
    total, count = token_nll(model, loader)
    uni_ppl, uni_count = unigram_perplexity(train_ids, loader, vocab_size)
    if count != uni_count:  # would mean the two are not scored on the same tokens
        raise MfkitError(
            f"The model scored {count} tokens, the unigram {uni_count}.", "report this as a bug in mfkit.lm."
        )
    model_ppl = math.exp(total / count)
    return {
        "tokens": count,
        "model_perplexity": model_ppl,
        "unigram_perplexity": uni_ppl,
        "perplexity_ratio": uni_ppl / model_ppl,
    }
