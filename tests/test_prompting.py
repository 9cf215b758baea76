"""Label-word scoring: exact log-likelihoods, the one-token fast path, batching independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mfkit.errors import MfkitError
from mfkit.prompting import chat_prompt, continuation_logprobs

WORDS = [
    "<pad>",
    "the",
    "mail",
    "is",
    "spam",
    "ham",
    "free",
    "money",
    "meeting",
    "at",
    "noon",
    "very",
    "much",
]


@pytest.fixture(scope="module")
def lm():
    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(WORDS),
            n_positions=32,
            n_embd=16,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    return model.eval(), tokenizer


def by_hand(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logprobs = F.log_softmax(model(ids).logits[0], dim=-1)
    return sum(logprobs[len(ctx) - 1 + t, tok].item() for t, tok in enumerate(cont))


def test_single_token_fast_path_matches_hand_computation(lm):
    model, tokenizer = lm
    contexts = ["the mail is", "free money the mail is", "meeting at noon the mail is"]
    scores = continuation_logprobs(model, tokenizer, contexts, ["spam", "ham"], batch_size=2)
    expected = [[by_hand(model, tokenizer, c, w) for w in ("spam", "ham")] for c in contexts]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_multi_token_continuations_match_hand_computation(lm):
    model, tokenizer = lm
    contexts = ["the mail is", "free money"]
    labels = ["very much spam", "ham"]
    scores = continuation_logprobs(model, tokenizer, contexts, labels, batch_size=3)
    expected = [[by_hand(model, tokenizer, c, w) for w in labels] for c in contexts]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert (scores < 0).all()


def test_batch_size_does_not_change_scores(lm):
    model, tokenizer = lm
    contexts = ["the mail is", "free money free money the mail is", "noon"]
    a = continuation_logprobs(model, tokenizer, contexts, ["spam", "ham"], batch_size=1)
    b = continuation_logprobs(model, tokenizer, contexts, ["spam", "ham"], batch_size=8)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs(lm):
    model, tokenizer = lm
    with pytest.raises(MfkitError, match="Nothing to score"):
        continuation_logprobs(model, tokenizer, [], ["spam"])
    with pytest.raises(MfkitError, match="no chat template"):
        chat_prompt(tokenizer, "hello")


def previous_implementation(model, tokenizer, contexts, continuations) -> np.ndarray:
    """The computation before positions were selected: one float32 log-softmax over the whole padded batch."""
    ctx = [tokenizer(c)["input_ids"] for c in contexts]
    cont = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in continuations]
    pairs = [(i, j) for i in range(len(ctx)) for j in range(len(cont))]
    seqs = [ctx[i] + cont[j] for i, j in pairs]
    longest = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (longest - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    scores = np.zeros((len(ctx), len(cont)))
    for row, (i, j) in enumerate(pairs):
        positions = torch.arange(len(ctx[i]) - 1, len(ctx[i]) - 1 + len(cont[j]))
        scores[i, j] = logprobs[row, positions, torch.tensor(cont[j])].sum().item()
    return scores


def test_selecting_positions_first_gives_the_previous_scores(lm):
    model, tokenizer = lm
    contexts = ["the mail is", "free money free money the mail is", "noon"]
    for labels in (
        ["very much spam", "ham"],
        ["spam", "ham"],
    ):  # the general path and the one-token fast path
        scores = continuation_logprobs(
            model, tokenizer, contexts, labels, batch_size=len(contexts) * len(labels)
        )
        np.testing.assert_allclose(
            scores, previous_implementation(model, tokenizer, contexts, labels), rtol=1e-6, atol=1e-6
        )
