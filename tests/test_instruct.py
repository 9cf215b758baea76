"""Instruction tuning plumbing: answer-only labels, length filtering, batched greedy answers, BLEU/chrF."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.instruct import (
    IGNORE_INDEX,
    answer_tokens,
    encode_pair,
    format_prompt,
    generate_answers,
    instruction_loader,
    tokenize_pairs,
    translation_scores,
)
from mfkit.training import TrainConfig, fit

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "user",
    "assistant",
    "simplify",
    "thou",
    "art",
    "you",
    "are",
    "ye",
    "shall",
    "will",
    "go",
    "unto",
    "to",
    "the",
    "city",
    "and",
    "lo",
    "see",
    "behold",
    "look",
    "a",
    "great",
    "stone",
    "big",
    "rock",
    "<unk>",
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
INSTRUCTION = "simplify"
PAIRS = [
    ("thou art", "you are"),
    ("ye shall go unto the city", "you will go to the city"),
    ("lo a great stone", "see a big rock"),
    ("behold the city", "look the city"),
]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
    )
    tok.chat_template = TEMPLATE
    return tok


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    seed_everything(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def pairs_dataset() -> Dataset:
    return Dataset.from_dict({"source": [s for s, _ in PAIRS], "target": [t for _, t in PAIRS]})


def test_labels_cover_the_answer_and_its_end_only(tokenizer):
    row = encode_pair(tokenizer, "thou art", "you are", instruction=INSTRUCTION)
    prompt = tokenizer(format_prompt(tokenizer, "thou art", INSTRUCTION), add_special_tokens=False)[
        "input_ids"
    ]
    answer = tokenizer("you are", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert (
        tokenizer.convert_ids_to_tokens(prompt)[-1] == "assistant"
    )  # the prompt ends where the answer starts
    assert prompt.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2


def test_long_examples_are_left_out_not_cut(tokenizer):
    data = pairs_dataset()
    lengths = [len(encode_pair(tokenizer, s, t, INSTRUCTION)["input_ids"]) for s, t in PAIRS]
    limit = sorted(lengths)[1]
    kept = tokenize_pairs(data, tokenizer, max_length=limit, instruction=INSTRUCTION)
    assert len(kept) == sum(n <= limit for n in lengths)
    assert all(row["labels"][-1] == tokenizer.eos_token_id for row in kept)  # no answer lost its end
    assert answer_tokens(kept) == sum(sum(t != IGNORE_INDEX for t in row["labels"]) for row in kept)
    with pytest.raises(MfkitError, match="fits"):
        tokenize_pairs(data, tokenizer, max_length=3, instruction=INSTRUCTION)
    with pytest.raises(MfkitError, match="target_column"):
        tokenize_pairs(data, tokenizer, max_length=64, target_column="bbe")


def test_model_loss_is_the_answer_tokens_cross_entropy(tokenizer):
    model = tiny_llama(len(tokenizer)).eval()
    loader = instruction_loader(
        tokenize_pairs(pairs_dataset(), tokenizer, 64, instruction=INSTRUCTION),
        tokenizer,
        batch_size=4,
        shuffle=False,
    )
    batch = next(iter(loader))
    assert (batch["labels"] == IGNORE_INDEX).sum() > (batch["input_ids"] == 0).sum()  # prompts and padding
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    by_hand = F.cross_entropy(logits[keep], labels[keep])
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_batched_answers_match_one_by_one(tokenizer):
    model = tiny_llama(len(tokenizer))
    prompts = [format_prompt(tokenizer, s, INSTRUCTION) for s, _ in PAIRS]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=4, progress=False)
    single = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=1, progress=False)
    assert batched == single
    assert all(len(tokenizer(a, add_special_tokens=False)["input_ids"]) <= 5 for a in batched)
    assert model.training  # the mode is restored


def test_a_trained_model_answers_with_the_targets(tokenizer):
    model = tiny_llama(len(tokenizer))
    loader = instruction_loader(
        tokenize_pairs(pairs_dataset(), tokenizer, 64, instruction=INSTRUCTION),
        tokenizer,
        batch_size=4,
        seed=0,
    )
    fit(model, loader, TrainConfig(max_steps=60, lr=1e-2, warmup=0, weight_decay=0.0, progress=False))
    prompts = [format_prompt(tokenizer, s, INSTRUCTION) for s, _ in PAIRS]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=10, batch_size=3, progress=False)
    assert answers == [t for _, t in PAIRS]  # and each stopped at the end-of-turn token
    assert translation_scores(answers, [t for _, t in PAIRS]) == {
        "bleu": pytest.approx(100),
        "chrf": pytest.approx(100),
    }


def test_translation_scores():
    refs = ["and there he saw a water hole in a field", "then jacob went on his journey"]
    perfect = translation_scores(refs, refs)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    close = translation_scores(["and he saw a water hole in the field", "then jacob went on"], refs)
    far = translation_scores(["behold a well", "lo"], refs)
    assert 0 <= far["chrf"] < close["chrf"] < 100
    assert far["bleu"] < close["bleu"]
    with pytest.raises(MfkitError, match="hypotheses"):
        translation_scores(["one"], refs)
