"""Data augmentation for low-resource text classification: EDA operators, pseudo-labels, adversarial training.

    eda(text, rng)                     one augmented copy: synonym replacement, random insertion, random swap or
                                       random deletion (Wei & Zou, 2019), synonyms from a shipped WordNet table
    augment_texts(texts, labels, ...)  the labelled set plus `copies` EDA copies of each text, labels kept
    perturb(text, rng, rate)           a noisy copy for robustness tests: character swaps, typos, inserted words
    select_confident(probs, threshold) pseudo-labels: the unlabelled rows the model is sure enough about
    fgm_loss(epsilon)                  a `fit` loss: clean loss + loss at the FGM-perturbed word embeddings
                                       (Miyato et al., 2017)
    back_translate(texts, ...)         paraphrases through a pivot language with two hub translation models

Every random choice goes through a `random.Random` the caller seeds, so the same seed gives the same copies.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import MfkitError, check_choice, check_positive
from .paths import data_dir  # noqa: F401  (tests read the table's path through it)

SYNONYMS_FILE = "wordnet_synonyms.json.gz"
OPERATORS = ("synonym", "insert", "swap", "delete")
PERTURBATIONS = ("char_swap", "typo", "insert")
# Neighbouring keys on a QWERTY keyboard: the typo operator replaces a letter by one of these.
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
NOISE_WORDS = ("the", "and", "also", "just", "really", "very", "so", "well", "now", "here")
_CORE = re.compile(r"^([^A-Za-z]*)([A-Za-z]+)([^A-Za-z]*)$")

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# Synonyms and stop words
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def load_synonyms(path: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """word -> its WordNet synonyms (single words, most frequent senses first), from the shipped table.

    The table (data/wordnet_synonyms.json.gz, built by data/build_wordnet.py) covers the words of the shipped
    spam mails; pass `path` for a table built over other text.
    """
    path = Path(path) if path is not None else data_dir() / SYNONYMS_FILE
    if not path.is_file():
        raise MfkitError(
            f"The synonym table {path} is missing.",
            "rebuild it with `python data/build_wordnet.py` (needs apt-get), or reinstall mfkit.",
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = json.load(f)["synonyms"]
    return {word: tuple(found) for word, found in table.items()}


@functools.cache
def stop_words() -> frozenset[str]:
    """English stop words (scikit-learn's list): EDA never replaces or inserts around these."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def _synonyms_of(word: str, synonyms: Mapping[str, Sequence[str]]) -> Sequence[str]:
    """The synonyms of a word's alphabetic core, lower case ("Money!" -> those of "money"); () for stop words."""
    match = _CORE.match(word)
    if match is None:
        return ()
    core = match.group(2).lower()
    return () if core in stop_words() else synonyms.get(core, ())


def _replace_core(word: str, new: str) -> str:
    """`word` with its alphabetic core replaced by `new`, punctuation around it kept ("offer," -> "deal,")."""
    match = _CORE.match(word)
    return f"{match.group(1)}{new}{match.group(3)}" if match else new


# --------------------------------------------------------------------------------------------------------------
# The four EDA operators, on lists of words
# --------------------------------------------------------------------------------------------------------------


def synonym_replacement(
    words: list[str], n: int, rng: random.Random, synonyms: Mapping[str, Sequence[str]]
) -> list[str]:
    """Replace up to `n` different words that have synonyms (stop words never) by a random synonym each."""
    out = list(words)
    candidates = [i for i, w in enumerate(words) if _synonyms_of(w, synonyms)]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        out[i] = _replace_core(words[i], rng.choice(_synonyms_of(words[i], synonyms)))
    return out


def random_insertion(
    words: list[str], n: int, rng: random.Random, synonyms: Mapping[str, Sequence[str]]
) -> list[str]:
    """Insert, `n` times, a synonym of a random word (that has one) at a random position."""
    out = list(words)
    candidates = [w for w in words if _synonyms_of(w, synonyms)]
    if not candidates:
        return out
    for _ in range(n):
        new = rng.choice(_synonyms_of(rng.choice(candidates), synonyms))
        out.insert(rng.randrange(len(out) + 1), new)
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Swap two randomly chosen words, `n` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability `p`; one random word survives if all would go."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def eda(
    text: str,
    rng: random.Random,
    alpha: float = 0.1,
    operator: str | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """One EDA copy of `text`: `operator` (or a random one of `OPERATORS`) applied with strength `alpha`.

    As in Wei & Zou (2019): the three counting operators change n = max(1, round(alpha * words)) words; deletion
    drops each word with probability alpha. Words are split on white space (line breaks become spaces).
    """
    if not isinstance(text, str):
        raise MfkitError(f"eda() got {type(text).__name__}, not a text.", "pass a string (empty is fine).")
    check_positive("alpha", alpha)
    if alpha >= 1:
        raise MfkitError(f"alpha={alpha!r} must be below 1.", "pass a fraction of the words, e.g. 0.1.")
    operator = operator or rng.choice(OPERATORS)
    check_choice("operator", operator, OPERATORS)
    words = text.split()
    if not words:
        return text
    synonyms = load_synonyms() if synonyms is None else synonyms
    n = max(1, round(alpha * len(words)))
    if operator == "synonym":
        words = synonym_replacement(words, n, rng, synonyms)
    elif operator == "insert":
        words = random_insertion(words, n, rng, synonyms)
    elif operator == "swap":
        words = random_swap(words, n, rng)
    else:
        words = random_deletion(words, alpha, rng)
    return " ".join(words)


def augment_texts(
    texts: Sequence[str],
    labels: Sequence[int],
    copies: int,
    seed: int = 0,
    alpha: float = 0.1,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[str], list[int], list[str]]:
    """The originals plus `copies` EDA copies of each (the operators taken in turn), each with its source's label.

    Returns (texts, labels, operator of each row: "original" for the originals). Copy k of text i is drawn from a
    generator seeded with (seed, i, k), so it does not depend on the other texts.
    """
    if len(texts) != len(labels):
        raise MfkitError(
            f"{len(texts)} texts but {len(labels)} labels.", "pass one label per text to augment_texts()."
        )
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise MfkitError(f"copies={copies!r} must be a whole number >= 0.", "pass copies=4, for example.")
    out_texts, out_labels, ops = list(texts), [int(y) for y in labels], ["original"] * len(texts)
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        for k in range(copies):
            operator = OPERATORS[k % len(OPERATORS)]
            rng = random.Random(f"eda-{seed}-{i}-{k}")
            out_texts.append(eda(text, rng, alpha, operator, synonyms))
            out_labels.append(int(label))
            ops.append(operator)
    return out_texts, out_labels, ops


# --------------------------------------------------------------------------------------------------------------
# Perturbations for the robustness test
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _neighbours() -> dict[str, str]:
    """letter -> the letters next to it on a QWERTY keyboard (same row and the rows above and below)."""
    where = {c: (r, i) for r, row in enumerate(KEYBOARD_ROWS) for i, c in enumerate(row)}
    return {
        c: "".join(d for d, (r2, i2) in where.items() if d != c and abs(r - r2) <= 1 and abs(i - i2) <= 1)
        for c, (r, i) in where.items()
    }


def swap_chars(word: str, rng: random.Random) -> str:
    """Swap two neighbouring characters inside a word (the first and last stay); shorter words are kept."""
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def typo(word: str, rng: random.Random) -> str:
    """Replace one letter by a neighbouring key (case kept); a word without letters is kept."""
    letters = [i for i, c in enumerate(word) if c.lower() in _neighbours()]
    if not letters:
        return word
    i = rng.choice(letters)
    new = rng.choice(_neighbours()[word[i].lower()])
    return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1 :]


def perturb(
    text: str,
    rng: random.Random,
    rate: float = 0.1,
    kinds: Sequence[str] = PERTURBATIONS,
    noise_words: Sequence[str] = NOISE_WORDS,
) -> str:
    """A noisy copy of `text`: each word, with probability `rate`, gets one perturbation of `kinds`.

    "char_swap" swaps two inner characters, "typo" hits a neighbouring key, "insert" puts one of `noise_words`
    after the word. A human still reads the mail the same way; the label cannot have changed.
    """
    if not isinstance(text, str):
        raise MfkitError(f"perturb() got {type(text).__name__}, not a text.", "pass a string.")
    check_positive("rate", rate, allow_zero=True)
    if rate > 1 or not kinds:
        raise MfkitError(
            f"rate={rate!r} / kinds={list(kinds)!r} are not usable.",
            f"pass a rate in [0, 1] and at least one of {PERTURBATIONS}.",
        )
    for kind in kinds:
        check_choice("kind", kind, PERTURBATIONS)
    out = []
    for word in text.split():
        if rng.random() >= rate:
            out.append(word)
            continue
        kind = rng.choice(list(kinds))
        if kind == "char_swap":
            out.append(swap_chars(word, rng))
        elif kind == "typo":
            out.append(typo(word, rng))
        else:
            out.extend([word, rng.choice(list(noise_words))])
    return " ".join(out)


def perturb_texts(texts: Iterable[str], seed: int = 0, rate: float = 0.1, **kwargs: Any) -> list[str]:
    """`perturb` each text with a generator seeded with (seed, position): the same seed, the same noisy copies."""
    return [perturb(t, random.Random(f"perturb-{seed}-{i}"), rate, **kwargs) for i, t in enumerate(texts)]


# --------------------------------------------------------------------------------------------------------------
# Pseudo-labelling
# --------------------------------------------------------------------------------------------------------------


def select_confident(
    probs: np.ndarray, threshold: float, class_shares: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose largest class probability is at least `threshold`, and their predicted classes (pseudo-labels).

    With `class_shares` (e.g. the labelled set's class proportions), the confident rows are cut per class, the
    least confident first, until the pseudo-labels follow those shares: class-balanced self-training (Zou et al.,
    2018). Without it, a teacher that is sure of the majority class only feeds the student more of that class
    every round.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or not 0 < threshold <= 1:
        raise MfkitError(
            f"select_confident needs probabilities [rows, classes] and a threshold in (0, 1]; got shape "
            f"{probs.shape} and {threshold!r}.",
            "pass the softmax outputs (classify.predict(...).probs) and e.g. threshold=0.9.",
        )
    rows = np.flatnonzero(probs.max(axis=1) >= threshold)
    if class_shares is None:
        return rows, probs[rows].argmax(axis=1)
    shares = np.asarray(class_shares, dtype=np.float64)
    if shares.shape != (probs.shape[1],) or np.any(shares < 0) or not np.isclose(shares.sum(), 1.0):
        raise MfkitError(
            f"class_shares={list(class_shares)} must give one share per class ({probs.shape[1]}), summing to 1.",
            "pass the labelled set's class proportions, e.g. np.bincount(labels) / len(labels).",
        )
    predicted = probs[rows].argmax(axis=1)
    available = np.bincount(predicted, minlength=len(shares))
    wanted = shares > 0
    total = int(np.floor(np.min(available[wanted] / shares[wanted])))  # the scarcest class sets the size
    keep = []
    for c in np.flatnonzero(wanted):
        mine = rows[predicted == c]
        surest = mine[np.argsort(-probs[mine, c], kind="stable")]
        keep.append(surest[: int(round(total * shares[c]))])
    chosen = np.sort(np.concatenate(keep)) if keep else rows[:0]
    return chosen, probs[chosen].argmax(axis=1)


# --------------------------------------------------------------------------------------------------------------
# Adversarial training on the embeddings (FGM)
# --------------------------------------------------------------------------------------------------------------


# The clean loss is multiplied by this before differentiating it for FGM's direction. Under fp16 autocast most
# entries of dL/d(embeddings) (median ~3e-6 on MiniLM) fall below fp16's smallest normal number (6.1e-5) and lose
# their precision; scaled by 2^12 they do not. A power of two is exact in fp32, and only the direction is used,
# so the scale drops out of r (like the loss scale of fp16 training, which fit's scaler handles, not this grad).
FGM_GRAD_SCALE = 2.0**12


def fgm_perturbation(grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """r = epsilon * g / ||g||_2, the norm taken over each example's whole embedding sequence [T, d]."""
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return epsilon * grad / norms.view(-1, *([1] * (grad.dim() - 1)))


def _bare(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or compile) wrapper."""
    return getattr(model, "module", getattr(model, "_orig_mod", model))


def fgm_loss(epsilon: float, adversarial_weight: float = 1.0) -> LossFn:
    """A `fit(..., loss_fn=...)` that adds the FGM adversarial loss (Miyato et al., 2017) to the clean loss.

    For a batch: e = the word embeddings of its tokens, L = the model's loss at e, g = dL/de (one backward through
    the network to the embeddings, no weight gradients; taken of L * FGM_GRAD_SCALE so that fp16 keeps its small
    entries), r = epsilon * g / ||g|| per example, held constant;
    return L + adversarial_weight * L(e + r). `fit` backpropagates the sum, so the weights get the gradients of
    both. The embedding matrix itself is never modified: the perturbation lives in this batch's activations only.
    """
    check_positive("epsilon", epsilon)
    check_positive("adversarial_weight", adversarial_weight, allow_zero=True)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = dict(batch)
        if "input_ids" not in inputs or "labels" not in inputs:
            raise MfkitError(
                "fgm_loss needs batches with input_ids and labels.", "use classify.classification_loaders."
            )
        embeds = _bare(model).get_input_embeddings()(inputs.pop("input_ids"))
        clean = model(inputs_embeds=embeds, **inputs).loss
        if not embeds.requires_grad:  # a frozen embedding matrix: there is nothing to differentiate
            return clean
        (grad,) = torch.autograd.grad(clean * FGM_GRAD_SCALE, embeds, retain_graph=True)
        r = fgm_perturbation(grad.detach(), epsilon)
        adversarial = model(inputs_embeds=embeds + r, **inputs).loss
        return clean + adversarial_weight * adversarial

    return loss_fn


# --------------------------------------------------------------------------------------------------------------
# Back-translation (needs the hub)
# --------------------------------------------------------------------------------------------------------------


def back_translate(
    texts: Sequence[str],
    forward_model: str = "Helsinki-NLP/opus-mt-en-de",
    backward_model: str = "Helsinki-NLP/opus-mt-de-en",
    max_length: int = 256,
    batch_size: int = 8,
    num_beams: int = 1,
    do_sample: bool = True,
    seed: int = 0,
) -> list[str]:
    """Paraphrases of `texts`: translate to a pivot language and back with two seq2seq hub models.

    Sampling (rather than beam search) on the way back gives more varied paraphrases (Edunov et al., 2018). Needs
    the two models from the Hugging Face Hub: where it cannot be reached, one `MfkitError` says so.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from .models import _hub_error

    def load(name: str) -> tuple[Any, Any]:
        try:
            return AutoTokenizer.from_pretrained(name), AutoModelForSeq2SeqLM.from_pretrained(name).eval()
        except OSError as exc:
            raise _hub_error(name, exc) from exc

    def translate(batch: list[str], tokenizer: Any, model: Any, sample: bool) -> list[str]:
        encoded = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **encoded, max_new_tokens=max_length, num_beams=num_beams, do_sample=sample, top_k=50
            )
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    there, back = load(forward_model), load(backward_model)
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = [t or "" for t in texts[start : start + batch_size]]
        out.extend(translate(translate(batch, *there, False), *back, do_sample))
    return out


# --------------------------------------------------------------------------------------------------------------
# Training and scoring a classifier on lists of texts
# --------------------------------------------------------------------------------------------------------------


def encode_texts(texts: Sequence[str], labels: Sequence[int], tokenizer: Any, max_length: int) -> Any:
    """A `datasets.Dataset` of token ids (truncated to `max_length`, not padded) and `labels`."""
    from datasets import Dataset

    check_positive("max_length", max_length)
    if len(texts) != len(labels):
        raise MfkitError(f"{len(texts)} texts but {len(labels)} labels.", "pass one label per text.")
    encoded = tokenizer([t or "" for t in texts], truncation=True, max_length=max_length)
    columns = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
    return Dataset.from_dict({**columns, "labels": [int(y) for y in labels]})


def text_loader(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Any:
    """A loader over `texts` with dynamic padding (shuffled in a seeded order for training)."""
    from .loaders import make_loader, pad_collate

    dataset = encode_texts(texts, labels, tokenizer, max_length)
    return make_loader(dataset, batch_size, pad_collate(tokenizer.pad_token_id), shuffle=shuffle, seed=seed)


def predict_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
    batch_size: int,
) -> Any:
    """`classify.predict` over a list of texts: logits, probabilities and labels."""
    from .classify import predict

    return predict(model, text_loader(texts, labels, tokenizer, max_length, batch_size))
