"""Sequence-to-sequence by instruction: teach a chat model a text-to-text task (e.g. verse simplification).

Each pair (source, target) becomes one chat turn in the model's own template:

    prompt = chat_prompt(tokenizer, instruction + source)      # ends where the assistant's answer starts
    tokens = prompt tokens + target tokens + end-of-turn token
    labels = -100 on every prompt token, the token itself on every answer token

Cross-entropy ignores -100, so the model is trained only to *answer*, never to reproduce the instruction or the
source; the end-of-turn token at the end teaches it to stop. `generate_answers` then decodes greedily (in batches,
left-padded) and `translation_scores` compares the answers with references by BLEU and chrF (sacrebleu).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import MfkitError, check_positive
from .loaders import make_loader, pad_collate
from .prompting import chat_prompt

IGNORE_INDEX = -100
DEFAULT_INSTRUCTION = (
    "Rewrite this Bible verse in Basic English: plain, everyday words and short sentences. "
    "Reply with the rewritten verse only."
)


def user_message(source: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user's turn: the instruction, a blank line, then the text to transform."""
    return f"{instruction}\n\n{source}"


def format_prompt(
    tokenizer: Any, source: str, instruction: str = DEFAULT_INSTRUCTION, system: str | None = None
) -> str:
    """The chat-formatted prompt for `source`, ending where the model's answer begins."""
    return chat_prompt(tokenizer, user_message(source, instruction), system)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an answer (the tokenizer's eos, e.g. `<|im_end|>` for ChatML templates)."""
    token_id = getattr(tokenizer, "eos_token_id", None)
    if token_id is None:
        raise MfkitError(
            "The tokenizer has no end-of-turn (eos) token, so a trained answer could not learn where to stop.",
            "use a chat model's tokenizer, or set tokenizer.eos_token to the template's end-of-turn token.",
        )
    return int(token_id)


def encode_pair(
    tokenizer: Any,
    source: str,
    target: str,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = None,
) -> dict[str, list[int]]:
    """Token ids of one training example and its labels: -100 over the prompt, the answer (+ eos) after it.

    Prompt and answer are tokenized separately, exactly as they meet at generation time: the model reads the
    prompt's tokens and continues with the answer's.
    """
    prompt_ids = list(
        tokenizer(format_prompt(tokenizer, source, instruction, system), add_special_tokens=False)[
            "input_ids"
        ]
    )
    answer_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [end_of_turn_id(tokenizer)]
    return {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def tokenize_pairs(
    dataset: Any,
    tokenizer: Any,
    max_length: int,
    source_column: str = "source",
    target_column: str = "target",
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = None,
) -> Any:
    """`encode_pair` over a `datasets.Dataset`; examples longer than `max_length` tokens are left out.

    Cutting an example would drop the end of its answer (and the end-of-turn token with it), teaching the model
    never to stop, so long examples are skipped instead: compare `len(result)` with `len(dataset)` to see how
    many. Raises if none fits.
    """
    check_positive("max_length", max_length)
    for column in (source_column, target_column):
        if column not in dataset.column_names:
            raise MfkitError(
                f"The column {column!r} is not in the data; its columns are {dataset.column_names}.",
                "pass source_column= and target_column= naming the input and the reference text.",
            )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [
            encode_pair(tokenizer, s, t, instruction, system)
            for s, t in zip(batch[source_column], batch[target_column], strict=True)
        ]
        return {key: [row[key] for row in rows] for key in ("input_ids", "attention_mask", "labels")}

    encoded = dataset.map(
        encode, batched=True, remove_columns=dataset.column_names, keep_in_memory=True, desc="tokenize pairs"
    )
    kept = encoded.filter(lambda row: len(row["input_ids"]) <= max_length, keep_in_memory=True)
    if len(kept) == 0:
        raise MfkitError(
            f"None of the {len(dataset)} examples fits in max_length={max_length} tokens (prompt + answer).",
            "raise max_length, or shorten the instruction / system message.",
        )
    return kept


def instruction_loader(
    tokenized: Any, tokenizer: Any, batch_size: int, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """Batches of `tokenize_pairs` rows, right-padded to the batch's longest; padded labels are -100."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    return make_loader(tokenized, batch_size, pad_collate(pad_id, IGNORE_INDEX), shuffle=shuffle, seed=seed)


def answer_tokens(tokenized: Any) -> int:
    """How many tokens carry a label (the answers the loss is computed on)."""
    return sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in tokenized["labels"])


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to chat-formatted `prompts` (one string per prompt, the new text only, stripped).

    Prompts run in batches of similar length, left-padded so that every row's answer starts at the same
    position; each row stops at the end-of-turn token or after `max_new_tokens`.
    """
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    if not prompts:
        return []
    eos = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    encoded = [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc="generate", disable=not progress):
        longest = max(len(encoded[i]) for i in rows)
        ids = torch.tensor([[pad] * (longest - len(encoded[i])) + encoded[i] for i in rows], device=device)
        mask = torch.tensor(
            [[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in rows], device=device
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        for row, i in enumerate(rows):
            answers[i] = tokenizer.decode(out[row, longest:], skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100) of `hypotheses` against one reference each.

    BLEU: geometric mean of word 1- to 4-gram precisions times a brevity penalty. chrF: F-score (recall weighted
    twice as much as precision) of character 1- to 6-grams, kinder to small spelling and word-form changes.
    """
    try:
        import sacrebleu
    except ImportError as exc:
        raise MfkitError(
            "BLEU and chrF come from the sacrebleu package, which is not installed.", "pip install sacrebleu"
        ) from exc
    if len(hypotheses) != len(references) or not hypotheses:
        raise MfkitError(
            f"{len(hypotheses)} hypotheses for {len(references)} references.",
            "pass one non-empty list of each, in the same order.",
        )
    refs = [list(references)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(list(hypotheses), refs).score),
        "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), refs).score),
    }
