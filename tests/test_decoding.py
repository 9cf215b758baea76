"""Decoding: the strategies' distributions, left-padded batches, and the text scores."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mfkit import decoding
from mfkit.errors import MfkitError

WORDS = ["<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "and"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    return tok


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(WORDS), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def test_filters_keep_what_their_definition_keeps(model, tokenizer):
    ids = torch.tensor(tokenizer("the cat")["input_ids"])
    full = decoding.next_token_distribution(model, ids)
    assert full.sum().item() == pytest.approx(1.0, abs=1e-5) and (full > 0).all()
    top3 = decoding.next_token_distribution(model, ids, top_k=3)
    assert (top3 > 0).sum() == 3
    assert set(top3.nonzero().flatten().tolist()) == set(full.topk(3).indices.tolist())
    kept = full.topk(3).indices
    assert top3[kept].tolist() == pytest.approx((full[kept] / full[kept].sum()).tolist(), rel=1e-5)
    nucleus = decoding.next_token_distribution(model, ids, top_p=0.5)
    kept = nucleus > 0
    ordered = full.sort(descending=True).values
    smallest = int((ordered.cumsum(0) < 0.5).sum()) + 1  # the smallest prefix whose mass reaches 0.5
    assert int(kept.sum()) == smallest
    cold, hot = (decoding.next_token_distribution(model, ids, temperature=t) for t in (0.5, 2.0))
    assert decoding.entropy_bits(cold) < decoding.entropy_bits(full) < decoding.entropy_bits(hot)


def test_repetition_filters_act_on_seen_tokens(model, tokenizer):
    ids = torch.tensor(tokenizer("the cat the cat the")["input_ids"])
    full = decoding.next_token_distribution(model, ids)
    banned = decoding.next_token_distribution(model, ids, no_repeat_ngram=2)
    assert banned[WORDS.index("cat")] == 0 and full[WORDS.index("cat")] > 0
    logits_seen = decoding.next_token_distribution(model, ids, repetition_penalty=2.0)
    unseen = [i for i, w in enumerate(WORDS) if w not in {"the", "cat"}]
    ratio = logits_seen[unseen] / full[unseen]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)  # unseen tokens keep their proportions


def test_a_left_padded_batch_continues_each_prompt_as_if_alone(model, tokenizer):
    prompts = ["the cat sat on the", "a dog"]
    together = decoding.generate_batch(model, tokenizer, prompts, 6, decoding.strategy("greedy"))
    alone = [
        decoding.generate_batch(model, tokenizer, [p], 6, decoding.strategy("greedy"))[0] for p in prompts
    ]
    assert together == alone
    batch = decoding.encode_left_padded(tokenizer, prompts)
    assert batch["attention_mask"].tolist()[1][:3] == [0, 0, 0] and batch["input_ids"][:, -1].tolist() == [
        1,
        7,
    ]


def test_sampling_is_repeatable_under_a_seed_and_settings_are_checked(model, tokenizer):
    settings = decoding.sampling_settings(temperature=1.2, top_k=5, top_p=0.9)
    first = decoding.generate_batch(model, tokenizer, ["the"], 8, settings, seed=3)
    assert first == decoding.generate_batch(model, tokenizer, ["the"], 8, settings, seed=3)
    assert decoding.sampling_settings(temperature=0) == {"do_sample": False}
    with pytest.raises(MfkitError, match="top_p"):
        decoding.sampling_settings(top_p=0)
    with pytest.raises(MfkitError, match="strategy"):
        decoding.strategy("nucleus-ish")
    with pytest.raises(MfkitError, match="context"):
        decoding.generate_batch(model, tokenizer, ["the"], 80, settings)


def test_text_scores_by_hand(model):
    assert decoding.distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert decoding.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75
    assert decoding.repeated_ngram_share([5, 6, 5, 6, 5, 6], 2) == pytest.approx(3 / 5)
    assert math.isnan(decoding.repeated_ngram_share([1, 2], 4))
    ids = torch.tensor([[1, 2, 3, 4]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    expected = math.exp(-(logp[1, 3] + logp[2, 4]).item() / 2)
    assert decoding.continuation_perplexity(model, [1, 2], [3, 4]) == pytest.approx(expected, rel=1e-4)
    scores = decoding.score_continuations(model, [[1, 2], [1]], [[3, 4], []])
    assert scores.perplexity == pytest.approx(expected, rel=1e-4) and scores.mean_tokens == 1.0


def test_tokens_per_second_counts_exactly_the_new_tokens(model, tokenizer):
    assert decoding.tokens_per_second(model, tokenizer, ["the cat"], 5, use_cache=False, repeats=1) > 0


def test_the_playground_renders_text_and_the_two_distributions(model, tokenizer):
    from mfkit import playground

    models = {"tiny": (model, tokenizer)}
    text, fig = playground.render(
        models, playground.Settings(model="tiny", prompt="the cat", max_new_tokens=4)
    )
    assert isinstance(text, str) and len(fig.axes[0].patches) == 2 * 12
    with pytest.raises(MfkitError, match="unknown model"):
        playground.render(models, playground.Settings(model="big", prompt="the"))


def test_moving_a_slider_renders_again_with_the_new_value(model, tokenizer, monkeypatch):
    from mfkit import playground

    seen = []
    monkeypatch.setattr(playground, "render", lambda models, s: seen.append(s) or ("", None))
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    box = playground.playground({"tiny": (model, tokenizer)}, playground.Settings(model="tiny", prompt="the"))
    slider = next(c for c in box.children if getattr(c, "description", "") == "temperature")
    slider.value = 1.5
    assert [s.temperature for s in seen] == [0.8, 1.5]
    strategy = next(c for c in box.children if getattr(c, "description", "") == "strategy")
    strategy.value = "greedy"
    assert seen[-1].strategy == "greedy" and slider.disabled
