"""Tokenizers for the chain: train a byte-level BPE tokenizer, save and load it, and measure any tokenizer.

Notebook 01 trains the tokenizer on the Austen training split and saves it under `ARTIFACTS_DIR/tokenizer/`;
notebook 02 pretrains the tiny GPT with it (`load_trained_tokenizer`). `CharTokenizer` is the small baseline the
comparison needs, and `bpe_merges_by_hand` is BPE training written out in plain Python for reading.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import MfkitError, check_positive
from .paths import artifacts_dir, atomic_folder, require_artifact

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)
BYTE_ALPHABET_SIZE = 256
TOKENIZER_FOLDER = "tokenizer"
MADE_BY = "01_data-and-tokenizers"


# --------------------------------------------------------------------------------------------------------------
# Byte-level BPE: train, save, load
# --------------------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
    show_progress: bool = False,
) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`; return it as a `PreTrainedTokenizerFast`.

    The base vocabulary is the 256 byte values, so any string encodes without an unknown token and decodes back
    exactly. Merges are learned until the vocabulary (bytes + special tokens + merges) reaches `vocab_size`, or no
    pair occurs at least `min_frequency` times. `eos_token` doubles as the beginning-of-sequence token (as in
    GPT-2); `pad_token` is a separate token so padding is never mistaken for an end of text. Encoding adds no
    special tokens by itself: a language-model pipeline appends `eos_token` between documents where it wants one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(dict.fromkeys(special_tokens))
    for role, token in (("eos_token", eos_token), ("pad_token", pad_token)):
        if token not in special_tokens:
            raise MfkitError(
                f"{role}={token!r} is not among special_tokens={special_tokens}.",
                f"add {token!r} to special_tokens, or pass one of them as {role}.",
            )
    smallest = BYTE_ALPHABET_SIZE + len(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < smallest:
        raise MfkitError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE tokenizer.",
            f"use at least {smallest} (256 bytes + {len(special_tokens)} special tokens); a few thousand is usual.",
        )
    check_positive("min_frequency", min_frequency)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = 0

    def counted(items: Iterable[str]) -> Iterable[str]:
        nonlocal seen
        for text in items:
            seen += 1
            yield text

    backend.train_from_iterator(counted(texts), trainer=trainer)
    if seen == 0:
        raise MfkitError("train_bpe_tokenizer got no texts.", "pass a non-empty list (or column) of strings.")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=eos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )


def tokenizer_dir(artifacts: str | os.PathLike | None = None) -> Path:
    """Where notebook 01 saves the trained tokenizer: `ARTIFACTS_DIR/tokenizer`."""
    return artifacts_dir(artifacts) / TOKENIZER_FOLDER


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> Path:
    """Save `tokenizer` (`save_pretrained`) to `folder` atomically and return the folder.

    The files are written to a temporary folder beside `folder`, which then takes its place by rename: a crash
    half-way leaves the previous tokenizer (or nothing), never a half-written folder.
    """
    target = Path(folder).expanduser().resolve()
    with atomic_folder(target) as staging:
        tokenizer.save_pretrained(str(staging))
    return target


def load_trained_tokenizer(artifacts: str | os.PathLike | None = None) -> Any:
    """The tokenizer notebook 01 trained, from `ARTIFACTS_DIR/tokenizer` (a friendly stop if it is missing)."""
    from transformers import PreTrainedTokenizerFast

    folder = require_artifact(tokenizer_dir(artifacts), made_by=MADE_BY)
    if not (folder / "tokenizer.json").is_file():
        raise MfkitError(
            f"{folder} has no tokenizer.json (an interrupted or foreign save?).",
            f"run notebooks/{MADE_BY}.ipynb again with the same ARTIFACTS_DIR.",
        )
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def learned_merges(tokenizer: Any, limit: int | None = None) -> list[tuple[str, str]]:
    """The merges of a BPE tokenizer in the order they were learned (first = most frequent pair in training).

    Byte-level symbols are shown as the tokenizer stores them: `Ġ` is a space, `Ċ` a newline.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise MfkitError(f"The tokenizer is a {model.get('type')} model, not BPE.", "pass a BPE tokenizer.")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return merges[:limit] if limit is not None else merges


# --------------------------------------------------------------------------------------------------------------
# BPE by hand (for reading) and a character-level baseline
# --------------------------------------------------------------------------------------------------------------


def bpe_merges_by_hand(word_counts: Mapping[str, int], num_merges: int) -> list[tuple[tuple[str, str], int]]:
    """BPE training in plain Python: `num_merges` times, merge the most frequent adjacent pair of symbols.

    Each word starts as its characters; a pair's count is summed over all words, weighted by word frequency;
    merges never cross word boundaries. Ties go to the alphabetically first pair. Returns the merges with the
    counts they had when chosen; stops early when no pair is left.
    """
    check_positive("num_merges", num_merges, allow_zero=True)
    words = {tuple(word): count for word, count in word_counts.items() if word}
    merges: list[tuple[tuple[str, str], int]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        merges.append((best, count))
        words = {_merge_pair(symbols, best): n for symbols, n in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of `pair` in `symbols` (left to right, non-overlapping) by its concatenation."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


class CharTokenizer:
    """Characters as tokens: the vocabulary is every character seen in training, plus `[UNK]` (id 0).

    A closed vocabulary: a character never seen in training becomes `[UNK]` and cannot be decoded back.
    """

    unk_token = "[UNK]"
    unk_token_id = 0

    def __init__(self, characters: Iterable[str]) -> None:
        chars = sorted(set(characters) - {""})
        if any(len(c) != 1 for c in chars):
            raise MfkitError(
                "CharTokenizer takes single characters.", "pass an iterable of one-character strings."
            )
        self.id_to_token: list[str] = [self.unk_token, *chars]
        self.token_to_id: dict[str, int] = {c: i for i, c in enumerate(self.id_to_token) if i}

    @classmethod
    def train(cls, texts: Iterable[str], min_frequency: int = 1) -> CharTokenizer:
        """The characters of `texts` that occur at least `min_frequency` times."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        return cls(c for c, n in counts.items() if n >= min_frequency)

    def __len__(self) -> int:
        return len(self.id_to_token)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        return [self.token_to_id.get(c, self.unk_token_id) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.id_to_token[i] for i in ids)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token[i] for i in ids]

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------------------------
# Measuring a tokenizer
# --------------------------------------------------------------------------------------------------------------


def _is_hf(tokenizer: Any) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(tokenizer, PreTrainedTokenizerBase)


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (a transformers tokenizer or anything with `encode`)."""
    if _is_hf(tokenizer):
        # verbose=False: texts longer than the model's max length are fine here, we only count tokens
        return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [tokenizer.encode(text) for text in texts]


def decode_ids(tokenizer: Any, ids: Sequence[Sequence[int]]) -> list[str]:
    """The texts a tokenizer decodes `ids` back to (special tokens such as `[UNK]` kept)."""
    if _is_hf(tokenizer):
        return tokenizer.batch_decode(ids, skip_special_tokens=False)
    return [tokenizer.decode(row) for row in ids]


def tokenizer_stats(tokenizer: Any, texts: Sequence[str] | Iterable[str]) -> dict[str, float | int]:
    """How a tokenizer treats `texts`: sequence length, unknown tokens, and whether decoding gives the text back.

    - `tokens_per_word`: tokens / whitespace-separated words (lower means shorter sequences);
    - `chars_per_token`: characters / tokens;
    - `unk_rate`: share of tokens that are the unknown token (0 for a tokenizer without one);
    - `roundtrip_exact`: share of texts with `decode(encode(text)) == text`, character for character.
    Also returns `vocab_size` (`len(tokenizer)`, added tokens included) and the `texts`/`words`/`tokens` counts.
    """
    texts = [t for t in texts]
    if not all(isinstance(t, str) for t in texts):
        raise MfkitError("tokenizer_stats takes a list of strings.", "pass the text column, e.g. ds['text'].")
    words = sum(len(t.split()) for t in texts)
    if words == 0:
        raise MfkitError("tokenizer_stats got no words to measure.", "pass some non-empty texts.")
    ids = encode_texts(tokenizer, texts)
    tokens = sum(len(row) for row in ids)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(row.count(unk_id) for row in ids) if unk_id is not None else 0
    exact = sum(decoded == text for decoded, text in zip(decode_ids(tokenizer, ids), texts, strict=True))
    return {
        "vocab_size": len(tokenizer),
        "texts": len(texts),
        "words": words,
        "tokens": tokens,
        "tokens_per_word": tokens / words,
        "chars_per_token": sum(len(t) for t in texts) / max(tokens, 1),
        "unk_rate": unknown / max(tokens, 1),
        "roundtrip_exact": exact / len(texts),
    }
