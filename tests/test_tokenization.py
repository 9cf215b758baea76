"""Unit tests of mfkit.tokenization: BPE training, save/load, the char baseline and the statistics."""

from __future__ import annotations

import itertools

import pytest

from mfkit.errors import MfkitError
from mfkit.tokenization import (
    EOS_TOKEN,
    PAD_TOKEN,
    CharTokenizer,
    bpe_merges_by_hand,
    learned_merges,
    load_trained_tokenizer,
    save_tokenizer,
    tokenizer_dir,
    tokenizer_stats,
    train_bpe_tokenizer,
)

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood,",
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property.",
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"',
]
# Many distinct, repeated words: enough pairs for the trainer to fill any vocabulary size the tests ask for.
WORDS = ["".join(letters) for letters in itertools.product("abcdefgh", repeat=3)]
LARGE_CORPUS = [" ".join(WORDS[i : i + 16]) for i in range(0, len(WORDS), 16)] * 3


@pytest.fixture(scope="module")
def small_bpe():
    return train_bpe_tokenizer(SENTENCES * 5, vocab_size=320)


def test_bpe_round_trips_exactly(small_bpe):
    unseen = ["Café  naïve — 😀 don't\n\tstop ", "ASCII only, but never seen: xyzzy 12345!", ""]
    for text in SENTENCES + unseen:
        ids = small_bpe.encode(text, add_special_tokens=False)
        assert small_bpe.decode(ids) == text
    assert small_bpe.unk_token_id is None


def test_bpe_special_tokens(small_bpe):
    assert small_bpe.eos_token == EOS_TOKEN and small_bpe.bos_token == EOS_TOKEN
    assert small_bpe.pad_token == PAD_TOKEN and small_bpe.pad_token_id != small_bpe.eos_token_id
    assert small_bpe.encode("a man", add_special_tokens=True) == small_bpe.encode(
        "a man", add_special_tokens=False
    )


def test_bpe_learns_merges_that_shorten_text(small_bpe):
    merges = learned_merges(small_bpe, limit=5)
    assert len(merges) == 5 and all(len(m) == 2 for m in merges)
    text = SENTENCES[0]
    assert len(small_bpe.encode(text, add_special_tokens=False)) < 0.75 * len(text.encode("utf-8"))


@pytest.mark.parametrize("vocab_size", [300, 400])
def test_vocab_size_respected(vocab_size):
    tokenizer = train_bpe_tokenizer(LARGE_CORPUS, vocab_size=vocab_size)
    assert len(tokenizer) == vocab_size


def test_vocab_size_never_exceeded_on_a_tiny_corpus():
    tokenizer = train_bpe_tokenizer(["ab ab ab"], vocab_size=1000)
    assert 256 + 2 <= len(tokenizer) < 1000


@pytest.mark.parametrize("bad", [10, 257, 300.0, True])
def test_bad_vocab_size_is_explained(bad):
    with pytest.raises(MfkitError, match="vocab_size"):
        train_bpe_tokenizer(SENTENCES, vocab_size=bad)


def test_no_texts_is_explained():
    with pytest.raises(MfkitError, match="no texts"):
        train_bpe_tokenizer([], vocab_size=300)


def test_eos_must_be_special():
    with pytest.raises(MfkitError, match="eos_token"):
        train_bpe_tokenizer(SENTENCES, vocab_size=300, special_tokens=["<pad>"], pad_token="<pad>")


def test_save_and_load_round_trip(small_bpe, tmp_path):
    folder = save_tokenizer(small_bpe, tokenizer_dir(tmp_path))
    assert folder == tmp_path / "tokenizer" and (folder / "tokenizer.json").is_file()
    loaded = load_trained_tokenizer(tmp_path)
    assert len(loaded) == len(small_bpe)
    assert (loaded.eos_token, loaded.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    for text in SENTENCES:
        ids = small_bpe.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text


def test_save_replaces_atomically(small_bpe, tmp_path):
    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "stale.txt").write_text("from an older run")
    save_tokenizer(small_bpe, target)
    save_tokenizer(small_bpe, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]  # no staging folders left behind


def test_missing_tokenizer_names_notebook_01(tmp_path):
    with pytest.raises(MfkitError, match="01_data-and-tokenizers"):
        load_trained_tokenizer(tmp_path)


def test_char_tokenizer_closed_vocabulary():
    chars = CharTokenizer.train(["abc ab"])
    assert len(chars) == 5  # [UNK], space, a, b, c
    assert chars.encode("cab") == [4, 2, 3]
    assert chars.decode(chars.encode("abd")) == "ab[UNK]"


def test_stats_hand_checked():
    chars = CharTokenizer.train(["abc ab"])
    stats = tokenizer_stats(chars, ["ab c", "abd"])
    # words 2 + 1; tokens 4 + 3; one unknown ('d'); only "ab c" decodes back exactly
    assert stats["vocab_size"] == 5
    assert (stats["texts"], stats["words"], stats["tokens"]) == (2, 3, 7)
    assert stats["tokens_per_word"] == pytest.approx(7 / 3)
    assert stats["chars_per_token"] == pytest.approx(1.0)
    assert stats["unk_rate"] == pytest.approx(1 / 7)
    assert stats["roundtrip_exact"] == pytest.approx(0.5)


def test_stats_of_bpe(small_bpe):
    texts = ["a truth", "Netherfield 😀"]
    stats = tokenizer_stats(small_bpe, texts)
    expected = sum(len(small_bpe.encode(t, add_special_tokens=False)) for t in texts)
    assert stats["tokens"] == expected and stats["words"] == 4
    assert stats["unk_rate"] == 0.0 and stats["roundtrip_exact"] == 1.0


def test_stats_refuse_empty():
    with pytest.raises(MfkitError, match="no words"):
        tokenizer_stats(CharTokenizer("a"), ["", "  "])


def test_bpe_by_hand_on_the_classic_example():
    merges = bpe_merges_by_hand({"low": 5, "lower": 2, "newest": 6, "widest": 3}, 3)
    # e+s and s+t both occur 9 times; the tie goes to the alphabetically first pair
    assert merges == [(("e", "s"), 9), (("es", "t"), 9), (("l", "o"), 7)]
    assert bpe_merges_by_hand({"ab": 1}, 5) == [(("a", "b"), 1)]  # stops when no pair is left
