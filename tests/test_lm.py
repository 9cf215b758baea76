"""mfkit.lm: packing, a tiny GPT that learns, the save/load round trip, the unigram baseline."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.lm import (
    block_collate,
    build_tiny_gpt,
    compare_with_unigram,
    generate_samples,
    lm_loaders,
    pack_blocks,
    predicted_tokens,
    run_folder,
    save_tiny_gpt,
    tiny_gpt_config,
    token_stream,
    unigram_perplexity,
)
from mfkit.loaders import make_loader, pad_collate
from mfkit.models import load_model, load_tokenizer
from mfkit.training import TrainConfig, fit

PARAGRAPHS = [
    "It is a truth universally acknowledged, that a single man must be in want of a wife.",
    "The sun rose over the quiet village and the dogs began to bark.",
    "She walked to the window, looked at the rain, and sat down again.",
    "Mr. Bennet was among the earliest of those who waited on Mr. Bingley.",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE with an end-of-text token, trained on the paragraphs above."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(PARAGRAPHS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")


def small_model(tokenizer, block_size: int = 32):
    seed_everything(0)
    config = tiny_gpt_config(
        len(tokenizer),
        n_layer=2,
        n_embd=32,
        n_head=2,
        block_size=block_size,
        dropout=0.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return build_tiny_gpt(config)


def test_pack_blocks_cuts_the_stream_into_equal_blocks(tokenizer):
    texts = PARAGRAPHS[:10]
    stream = token_stream(texts, tokenizer).tolist()
    eos = tokenizer.eos_token_id
    assert stream.count(eos) == len(texts) and stream[-1] == eos
    assert stream[: stream.index(eos)] == tokenizer(texts[0], add_special_tokens=False)["input_ids"]

    blocks = pack_blocks(texts, tokenizer, block_size=16)
    assert len(blocks) == len(stream) // 16
    assert all(len(row) == 16 for row in blocks["input_ids"])
    assert blocks["labels"] == blocks["input_ids"]
    joined = [t for row in blocks["input_ids"] for t in row]
    assert joined == stream[: len(joined)]  # only the last partial block is dropped
    assert len(stream) - len(joined) < 16


def test_pack_blocks_refuses_too_little_text(tokenizer):
    with pytest.raises(MfkitError, match="fewer than one block"):
        pack_blocks(["a b"], tokenizer, block_size=512)


def test_config_checks_head_split():
    with pytest.raises(MfkitError, match="divisible"):
        tiny_gpt_config(100, n_embd=30, n_head=4)
    config = tiny_gpt_config(100, n_layer=1, n_embd=16, n_head=2, block_size=8, eos_token_id=0)
    assert config.tie_word_embeddings and config.n_positions == 8 and config.pad_token_id == 0


def test_tiny_gpt_loss_falls_on_a_repetitive_corpus(tokenizer):
    blocks = pack_blocks(PARAGRAPHS, tokenizer, block_size=32)
    loaders = lm_loaders({"train": blocks, "validation": blocks}, batch_size=8, eval_batches=2)
    assert len(loaders["validation"].dataset) == 16
    model = small_model(tokenizer)
    config = TrainConfig(
        max_steps=30, lr=1e-2, warmup=3, schedule="cosine", log_every=5, eval_every=15, progress=False
    )
    history = fit(model, loaders["train"], config, eval_loader=loaders["validation"])
    losses = [row["loss"] for row in history.train]
    assert losses[-1] < 0.5 * losses[0]
    # Already well below the unigram floor: the model uses context.
    unigram_ppl, _ = unigram_perplexity(
        token_stream(PARAGRAPHS, tokenizer), loaders["validation"], len(tokenizer)
    )
    assert math.exp(history.eval[-1]["eval_loss"]) < unigram_ppl / 3


def test_save_and_load_round_trip(tokenizer, tmp_path):
    model = small_model(tokenizer).eval()
    folder = save_tiny_gpt(model, tokenizer, artifacts=tmp_path)
    assert folder == tmp_path / "models" / "tiny-gpt"
    save_tiny_gpt(model, tokenizer, artifacts=tmp_path)  # overwriting an existing model works too
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny-gpt"]  # no staging folders left behind

    loaded = load_model("tiny-gpt", "causal-lm", artifacts=tmp_path).eval()
    ids = torch.tensor([tokenizer("She walked to the window")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    reloaded_tokenizer = load_tokenizer("tiny-gpt", artifacts=tmp_path)
    assert reloaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    text = generate_samples(loaded, reloaded_tokenizer, ["She walked"], max_new_tokens=5)
    assert text == generate_samples(model, tokenizer, ["She walked"], max_new_tokens=5)


def test_generate_refuses_to_run_past_the_context(tokenizer):
    model = small_model(tokenizer, block_size=8)
    with pytest.raises(MfkitError, match="context"):
        generate_samples(model, tokenizer, ["She walked"], max_new_tokens=20)


def test_unigram_baseline_by_hand():
    # Training counts over a vocabulary of 4: token 0 twice, 1 and 2 once, 3 never. Add-one smoothing:
    # p(0) = 3/8, p(1) = p(2) = 2/8, p(3) = 1/8.
    rows = [{"input_ids": [1, 0, 3], "labels": [1, 0, 3]}, {"input_ids": [2, 2, 1], "labels": [2, -100, 1]}]
    loader = make_loader(rows, batch_size=2, collate_fn=pad_collate(0), shuffle=False)
    # Causal-LM targets: labels from position 1 on, without -100 -> 0, 3 (row 1) and 1 (row 2).
    assert predicted_tokens(loader) == [0, 3, 1]
    ppl, n = unigram_perplexity([0, 0, 1, 2], loader, vocab_size=4)
    assert n == 3
    assert ppl == pytest.approx(math.exp(-(math.log(3 / 8) + math.log(1 / 8) + math.log(2 / 8)) / 3))


def test_model_and_unigram_are_scored_on_the_same_tokens(tokenizer):
    blocks = pack_blocks(PARAGRAPHS, tokenizer, block_size=32)
    loader = lm_loaders({"test": blocks}, batch_size=8)["test"]
    row = compare_with_unigram(
        small_model(tokenizer), loader, token_stream(PARAGRAPHS, tokenizer), len(tokenizer)
    )
    assert row["tokens"] == len(blocks) * 31
    assert row["perplexity_ratio"] == pytest.approx(row["unigram_perplexity"] / row["model_perplexity"])
    # An untrained model is roughly uniform over the vocabulary: worse than the unigram floor.
    assert row["model_perplexity"] > row["unigram_perplexity"]


def test_run_folder_depends_on_knobs_and_tokenizer(tokenizer, tmp_path):
    knobs = {"max_steps": 10, "lr": 1e-3, "artifacts_dir": tmp_path}
    folder = run_folder(knobs, tmp_path, tokenizer)
    assert folder.parent == tmp_path / "checkpoints" / "02"
    assert run_folder(dict(knobs), tmp_path, tokenizer) == folder  # a rerun resumes
    assert run_folder({**knobs, "lr": 2e-3}, tmp_path, tokenizer) != folder
    assert run_folder(knobs, tmp_path) != folder  # the tokenizer is part of the run


def test_block_collate_adds_no_attention_mask_and_the_loss_is_unchanged(tokenizer):
    """Packed blocks have no padding: no mask (an all-ones mask costs a host sync per forward on a GPU)."""
    blocks = pack_blocks(["one two three four five six seven eight nine ten"] * 8, tokenizer, 8)
    batch = block_collate([blocks[i] for i in range(4)])
    assert set(batch) == {"input_ids", "labels"}
    model = small_model(tokenizer).eval()
    with torch.no_grad():
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).loss
        torch.testing.assert_close(model(**batch).loss, masked)
