"""Prompt-based classification with a causal LM, scored by the log-likelihood of label words.

Free generation is a poor classifier: the model may answer "Sure! This email...", which then has to be parsed.
Instead, for a prompt x and each label word w_c (e.g. "spam", "ham"), score

    log p(w_c | x) = sum_i log p(w_c,i | x, w_c,<i)

and predict argmax_c. Every prompt gets an answer from the allowed set, and the scores are usable as logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import MfkitError


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """`user_text` wrapped in the model's chat template, ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise MfkitError(
            "This tokenizer has no chat template.", "use a plain prompt, or an instruction-tuned model."
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, texts: Sequence[str], special: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
    max_context_tokens: int | None = None,
) -> np.ndarray:
    """log p(continuation | context) for every pair: an array [len(contexts), len(continuations)] (nats).

    Context and continuation are tokenized separately and concatenated, so each label word is scored with the same
    tokens whatever precedes it. Contexts longer than `max_context_tokens` keep their last tokens (the end of a
    prompt holds the question). When every continuation is one token, one forward pass per context suffices.
    """
    if not contexts or not continuations:
        raise MfkitError("Nothing to score.", "pass at least one context and one continuation.")
    device = next(model.parameters()).device
    ctx_ids = _encode(tokenizer, contexts, special=True)
    if max_context_tokens:
        ctx_ids = [ids[-max_context_tokens:] for ids in ctx_ids]
    cont_ids = _encode(tokenizer, continuations, special=False)
    if any(not ids for ids in cont_ids):
        raise MfkitError("A continuation encodes to no tokens.", "use non-empty label words.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    scores = np.zeros((len(contexts), len(continuations)))
    single = all(len(ids) == 1 for ids in cont_ids)
    pairs = [(i, j) for i in range(len(contexts)) for j in ([0] if single else range(len(continuations)))]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [ctx_ids[i] + ([] if single else cont_ids[j]) for i, j in chunk]
        longest = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (i, j) in enumerate(chunk):
            n_ctx = len(ctx_ids[i])
            if single:  # the next-token distribution after the context scores every label word at once
                logprobs = F.log_softmax(logits[row, n_ctx - 1].float(), dim=-1)
                scores[i] = logprobs[[c[0] for c in cont_ids]].cpu().numpy()
            else:  # token t of the continuation is predicted at position n_ctx - 1 + t
                targets = torch.tensor(cont_ids[j], device=device)
                positions = torch.arange(n_ctx - 1, n_ctx - 1 + len(targets), device=device)
                # Only these positions need a distribution: a log-softmax over all [batch, T, vocab] logits in
                # float32 would take batch x T x vocab x 4 bytes (13 GB at 8 x 4,096 tokens x 100k words).
                logprobs = F.log_softmax(logits[row, positions].float(), dim=-1)
                scores[i, j] = logprobs[torch.arange(len(targets), device=device), targets].sum().item()
    model.train(was_training)
    return scores
