"""Preference alignment: teach a tuned model to prefer one answer over another (DPO, IPO, SimPO, ORPO).

A preference pair is a prompt x with a preferred answer y_w ("chosen") and a worse one y_l ("rejected"). With
log-probabilities of whole answers, log pi(y|x) = sum_t log pi(y_t | x, y_<t), the losses of one pair are:

    DPO    -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
    IPO    ([(mean log pi(y_w) - mean log ref(y_w)) - (mean log pi(y_l) - mean log ref(y_l))] - 1/(2 beta))^2
    SimPO  -log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma)
    ORPO   NLL(y_w) - beta * log sigmoid(log odds(y_w) - log odds(y_l)),  odds(y) = p / (1 - p), p = exp(mean log pi)

`mean` is the per-token average (the sum divided by the answer's length). DPO and IPO need the reference model's
log-probabilities, which never change: `with_reference_logps` computes them once and stores them beside each pair
(as `distill.with_teacher_logits` stores a teacher's logits). SimPO and ORPO need no reference.

    held_out_verses(...), preference_pairs(...)    pairs in the standard prompt / chosen / rejected form
    worst_of_samples(...)                          the lowest-chrF of a few sampled answers (a rejected variant)
    load_tuned(...), load_reference(...)           06's LoRA model as the policy, and merged and frozen as reference
    encode_preference(...), preference_loader(...) token ids of both answers, batched as [chosen..., rejected...]
    answer_logps(...)                              sum and count of the answer tokens' log-probabilities
    with_reference_logps(...)                      the reference's log-probabilities, computed once
    PreferenceLoss(method, beta, gamma)            a `fit(..., loss_fn=...)` for dpo, ipo, simpo, orpo and sft
    pair_scores(...), reward_metrics(...)          implicit-reward accuracy and margin, log-probs, on held-out pairs
    answer_kl(...), archaic_rate(...)              a KL estimate to the reference; the share of archaic words
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .data import normalize_text
from .decoding import generate_batch, sampling_settings
from .errors import MfkitError, check_choice, check_positive
from .instruct import IGNORE_INDEX, encode_pair, end_of_turn_id, format_prompt, translation_scores
from .loaders import make_loader, pad_collate

METHODS = ("dpo", "ipo", "simpo", "orpo", "sft")
REFERENCE_FREE = ("simpo", "orpo", "sft")
REF_CHOSEN, REF_REJECTED = "ref_chosen_logps", "ref_rejected_logps"
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "source", "kind")
SIDES = ("chosen", "rejected")
# Second-person and old verb forms that Basic English replaces (the -eth / -est endings are counted separately).
ARCHAIC_WORDS = frozenset(
    {"thou", "thee", "thy", "thine", "hath", "hast", "unto", "ye", "shalt", "doth", "dost", "saith"}
)
# Common words ending in -eth that are not old verb forms.
NOT_ARCHAIC_ETH = frozenset(
    {"teeth", "seth", "beth", "japheth", "nazareth", "elizabeth", "shibboleth", "heth"}
)
_WORD = re.compile(r"[a-z]+")


# --------------------------------------------------------------------------------------------------------------
# Preference data


def held_out_verses(verses: Any, n: int, seed: int = 0, exclude: Iterable[Any] = ()) -> Any:
    """`n` rows of `verses` (shuffled with `seed`) whose source text is in none of the datasets of `exclude`.

    Texts are compared in `data.normalize_text` form, so a verse repeated in another split (with other spacing
    or case) counts as the same verse. Pass the splits the earlier notebook trained and evaluated on.
    """
    check_positive("n", n)
    banned = {normalize_text(text) for dataset in exclude for text in dataset["source"]}
    shuffled = verses.shuffle(seed=seed)
    keep = [i for i, text in enumerate(shuffled["source"]) if normalize_text(text) not in banned][:n]
    if len(keep) < n:
        raise MfkitError(
            f"Only {len(keep)} of the {len(verses)} verses are outside the excluded data; {n} were asked for.",
            "ask for fewer verses, or draw them from a larger split.",
        )
    return shuffled.select(keep)


def sentence_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """chrF (0-100) of each hypothesis against its own reference."""
    return [translation_scores([h], [r])["chrf"] for h, r in zip(hypotheses, references, strict=True)]


def preference_pairs(
    tokenizer: Any,
    sources: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    kind: str,
    max_chrf: float = 100.0,
) -> Any:
    """A `datasets.Dataset` of pairs in the standard form: `prompt` (chat-formatted, as `instruct.format_prompt`
    writes it), `chosen`, `rejected`, plus the `source` verse and the `kind` of rejected answer.

    A pair is kept only where the rejected answer's chrF to the chosen one is below `max_chrf` (100 drops only
    the rejected answers identical to the chosen): a pair of equal answers teaches nothing.
    """
    from datasets import Dataset

    if not (len(sources) == len(chosen) == len(rejected)):
        raise MfkitError(
            f"{len(sources)} sources, {len(chosen)} chosen and {len(rejected)} rejected answers.",
            "pass one chosen and one rejected answer per source verse, in the same order.",
        )
    scores = sentence_chrf(rejected, chosen)
    rows = [
        (s, c, r)
        for s, c, r, score in zip(sources, chosen, rejected, scores, strict=True)
        if score < max_chrf and normalize_text(r) != normalize_text(c)
    ]
    return Dataset.from_dict(
        {
            "prompt": [format_prompt(tokenizer, s) for s, _, _ in rows],
            "chosen": [c for _, c, _ in rows],
            "rejected": [r for _, _, r in rows],
            "source": [s for s, _, _ in rows],
            "kind": [kind] * len(rows),
        }
    )


def worst_of_samples(
    model: nn.Module,
    tokenizer: Any,
    sources: Sequence[str],
    references: Sequence[str],
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
) -> list[str]:
    """For each source verse, `samples` sampled answers of `model`; the one with the lowest chrF to its reference."""
    check_positive("samples", samples)
    check_positive("batch_size", batch_size)
    prompts = [format_prompt(tokenizer, s) for s in sources for _ in range(samples)]
    settings = sampling_settings(temperature=temperature)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = generate_batch(
            model,
            tokenizer,
            prompts[start : start + batch_size],
            max_new_tokens,
            settings,
            seed=seed + start,
        )
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    worst = []
    for i, reference in enumerate(references):
        group = answers[i * samples : (i + 1) * samples]
        scores = sentence_chrf(group, [reference] * samples)
        worst.append(group[min(range(samples), key=scores.__getitem__)])
    return worst


def load_tuned(model: str, adapter_dir: str | Path, trainable: bool = True) -> nn.Module:
    """`model` with the LoRA adapter saved in `adapter_dir` (e.g. notebook 06's), its adapter trainable or not.

    Stops with a message naming notebook 06 when the adapter folder is missing. The base weights stay frozen.
    """
    from peft import PeftModel

    from .models import load_model
    from .paths import require_artifact

    folder = require_artifact(adapter_dir, "06_instruction-tuning")
    return PeftModel.from_pretrained(load_model(model, "causal-lm"), str(folder), is_trainable=trainable)


def load_reference(model: str, adapter_dir: str | Path) -> nn.Module:
    """The frozen reference policy: `model` with the adapter of `adapter_dir` merged into its weights, in eval
    mode, every parameter without gradients."""
    reference = load_tuned(model, adapter_dir, trainable=False).merge_and_unload().eval()
    return reference.requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Tokens and log-probabilities


def encode_preference(tokenizer: Any, source: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """Both answers to one prompt as `instruct.encode_pair` encodes a training example (label -100 on the prompt,
    the answer and its end-of-turn token after it), under the keys `chosen_*` and `rejected_*`."""
    row: dict[str, list[int]] = {}
    for side, answer in zip(SIDES, (chosen, rejected), strict=True):
        for key, value in encode_pair(tokenizer, source, answer).items():
            row[f"{side}_{key}"] = value
    return row


def tokenize_preferences(pairs: Any, tokenizer: Any, max_length: int) -> Any:
    """`encode_preference` over a pair dataset; pairs whose longer side exceeds `max_length` tokens are left out
    (a cut answer would lose its end-of-turn token). The text columns stay, for reading."""
    check_positive("max_length", max_length)
    missing = [c for c in ("source", "chosen", "rejected") if c not in pairs.column_names]
    if missing:
        raise MfkitError(
            f"The pairs lack the columns {missing}; they have {pairs.column_names}.",
            "build them with preference_pairs(...).",
        )
    encoded = pairs.map(
        lambda row: encode_preference(tokenizer, row["source"], row["chosen"], row["rejected"]),
        keep_in_memory=True,
        desc="tokenize preference pairs",
    )
    kept = encoded.filter(
        lambda row: max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"])) <= max_length,
        keep_in_memory=True,
    )
    if len(kept) == 0:
        raise MfkitError(
            f"None of the {len(pairs)} pairs fits in max_length={max_length} tokens.", "raise max_length."
        )
    return kept


def preference_collate(pad_id: int) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
    """One batch of B pairs as 2B right-padded rows, the B chosen answers first and then the B rejected ones
    (one forward pass scores both); cached reference log-probabilities, where present, are stacked as [2B]."""
    pad = pad_collate(pad_id, IGNORE_INDEX)
    fields = ("input_ids", "attention_mask", "labels")

    def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences = [{f: row[f"{side}_{f}"] for f in fields} for side in SIDES for row in rows]
        batch = pad(sequences)
        if REF_CHOSEN in rows[0]:
            batch["ref_logps"] = torch.tensor(
                [row[REF_CHOSEN] for row in rows] + [row[REF_REJECTED] for row in rows], dtype=torch.float32
            )
        return batch

    return collate


def preference_loader(
    tokenized: Any, tokenizer: Any, batch_size: int, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """Batches of `tokenize_preferences` rows (see `preference_collate`); text columns are dropped."""
    keep = [c for c in tokenized.column_names if c.startswith(("chosen_", "rejected_", "ref_"))]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    return make_loader(
        tokenized.select_columns(keep), batch_size, preference_collate(pad_id), shuffle=shuffle, seed=seed
    )


def answer_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count): per row, the summed log-probability (nats) of the tokens whose label is not -100, and how
    many there are. Token t is predicted from the tokens before it, so logits[:, t-1] scores labels[:, t]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def answer_batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of a `preference_loader` as rows for `representations.embed`: every answer (the chosen ones
    first, then the rejected ones, as the collate lays them out) with `labels` 1 for chosen and 0 for rejected."""
    for batch in loader:
        half = batch["input_ids"].shape[0] // 2
        yield {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([1] * half + [0] * half),
        }


@torch.no_grad()
def with_reference_logps(tokenized: Any, reference: nn.Module, tokenizer: Any, batch_size: int = 16) -> Any:
    """`tokenized` pairs plus `ref_chosen_logps` and `ref_rejected_logps`: the reference model's summed answer
    log-probabilities, computed in one pass (the reference is frozen, so they never change during training)."""
    for column in (REF_CHOSEN, REF_REJECTED):
        if column in tokenized.column_names:
            tokenized = tokenized.remove_columns(column)
    loader = preference_loader(tokenized, tokenizer, batch_size, shuffle=False)
    device = next(reference.parameters()).device
    was_training = reference.training
    reference.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    for batch in loader:
        sums, _ = answer_logps(reference, {k: v.to(device) for k, v in batch.items()})
        half = len(sums) // 2
        chosen += sums[:half].tolist()
        rejected += sums[half:].tolist()
    reference.train(was_training)
    return tokenized.add_column(REF_CHOSEN, chosen).add_column(REF_REJECTED, rejected)


# --------------------------------------------------------------------------------------------------------------
# The losses, on log-probabilities (tensors of one value per pair); each returns the mean over the pairs


def log_ratio_margin(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l): the margin DPO and IPO act on (the implicit rewards'
    difference over beta)."""
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): -log sigmoid(beta * margin of the log-ratios to the reference).
    log 2 where the policy equals the reference."""
    margin = log_ratio_margin(chosen, rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO (Azar et al., 2023): (margin of the log-ratios - 1 / (2 beta))^2, a regression of the margin to a
    fixed target instead of DPO's ever-growing one. 1 / (4 beta^2) where the policy equals the reference. Pass
    per-token mean log-probs (what trl's IPO and the paper's experiments use) or sums."""
    margin = log_ratio_margin(chosen, rejected, ref_chosen, ref_rejected)
    return ((margin - 1 / (2 * beta)) ** 2).mean()


def simpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 2.0, gamma: float = 0.5
) -> torch.Tensor:
    """SimPO (Meng et al., 2024): -log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma), on per-token
    mean log-probs (length-normalized), without a reference; gamma is the target margin."""
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma).mean()


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logps) < 1, computed stably as m - log(-expm1(m))."""
    return mean_logps - torch.log(-torch.expm1(mean_logps))


def orpo_loss(
    chosen_nll: torch.Tensor, chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """ORPO (Hong et al., 2024): NLL of the chosen answers plus beta * -log sigmoid(log odds ratio), the odds of
    each answer taken on its per-token mean probability; no reference. `chosen_nll` is the SFT loss (a scalar)."""
    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    return chosen_nll - beta * F.logsigmoid(ratio).mean()


def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = len(values) // 2
    return values[:half], values[half:]


class PreferenceLoss:
    """`fit(..., loss_fn=PreferenceLoss("dpo", beta=0.1))` on batches of `preference_loader`.

    dpo and ipo read the cached reference log-probs from the batch (`with_reference_logps`); simpo and orpo need
    none; sft is the baseline: the answer-token cross-entropy of the chosen answers alone (what notebook 06
    trained; the rejected answers are scored without gradients, for the trace only). In training mode every call
    adds the batch's mean chosen and rejected log-probabilities to `trace` (`trace_frame()` reads it).
    """

    def __init__(self, method: str = "dpo", beta: float = 0.1, gamma: float = 0.5) -> None:
        check_choice("method", method, METHODS)
        check_positive("beta", beta)
        if not isinstance(gamma, int | float) or isinstance(gamma, bool) or not math.isfinite(gamma):
            raise MfkitError(f"gamma={gamma!r} is not a finite number.", "pass SimPO's margin, e.g. 0.5.")
        self.method, self.beta, self.gamma = method, beta, gamma
        self.trace: list[
            torch.Tensor
        ] = []  # one [chosen, rejected] pair of mean log-probs per training batch

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.method == "sft":
            half = len(batch["input_ids"]) // 2
            sums, counts = answer_logps(model, {k: v[:half] for k, v in batch.items() if k != "ref_logps"})
            if model.training:
                with torch.no_grad():
                    rejected, _ = answer_logps(
                        model, {k: v[half:] for k, v in batch.items() if k != "ref_logps"}
                    )
                self._keep(sums, rejected)
            return -sums.sum() / counts.sum()
        sums, counts = answer_logps(model, batch)
        if model.training:
            self._keep(*_split(sums))
        means = sums / counts
        if self.method == "simpo":
            return simpo_loss(*_split(means), self.beta, self.gamma)
        if self.method == "orpo":
            chosen_sums, _ = _split(sums)
            chosen_counts, _ = _split(counts)
            return orpo_loss(-chosen_sums.sum() / chosen_counts.sum(), *_split(means), self.beta)
        if "ref_logps" not in batch:
            raise MfkitError(
                f"{self.method} needs the reference model's log-probs, and the batch has none.",
                "add them once with with_reference_logps(pairs, reference, tokenizer) before making the loader.",
            )
        ref = batch["ref_logps"].to(sums.dtype)
        if self.method == "ipo":
            return ipo_loss(*_split(means), *_split(ref / counts), self.beta)
        return dpo_loss(*_split(sums), *_split(ref), self.beta)

    def _keep(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Store the batch's means on the device, without a host sync (read once by `trace_frame`)."""
        self.trace.append(torch.stack([chosen.detach().float().mean(), rejected.detach().float().mean()]))

    def trace_frame(self, grad_accum: int = 1):
        """The trace as a DataFrame: step (1, 2, ...), logp_chosen, logp_rejected (means of the step's batches)."""
        import pandas as pd

        values = torch.stack(self.trace).cpu().numpy() if self.trace else torch.zeros((0, 2)).numpy()
        frame = pd.DataFrame(values, columns=["logp_chosen", "logp_rejected"])
        frame["step"] = frame.index // grad_accum + 1
        return frame.groupby("step", as_index=False).mean()[["step", "logp_chosen", "logp_rejected"]]

    def __repr__(self) -> str:
        return f"PreferenceLoss({self.method!r}, beta={self.beta}, gamma={self.gamma})"


# --------------------------------------------------------------------------------------------------------------
# Measuring


@torch.no_grad()
def pair_scores(model: nn.Module, loader: DataLoader) -> dict[str, torch.Tensor]:
    """Per pair of `loader` (in its order, with cached reference log-probs): the policy's summed log-probs of the
    chosen and the rejected answer (`chosen`, `rejected`), the reference's (`ref_chosen`, `ref_rejected`) and the
    answers' lengths in tokens (`chosen_tokens`, `rejected_tokens`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for batch in loader:
        if "ref_logps" not in batch:
            raise MfkitError(
                "The pairs carry no reference log-probs.", "add them with with_reference_logps(...) first."
            )
        sums, counts = answer_logps(model, {k: v.to(device) for k, v in batch.items()})
        for values, pair_of_names in (
            (sums, names[0:2]),
            (batch["ref_logps"], names[2:4]),
            (counts, names[4:6]),
        ):
            for name, half in zip(pair_of_names, _split(values.detach().double().cpu()), strict=True):
                parts[name].append(half)
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def implicit_rewards(scores: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards beta * log(pi(y|x) / ref(y|x)) of the chosen and the rejected answers."""
    return beta * (scores["chosen"] - scores["ref_chosen"]), beta * (
        scores["rejected"] - scores["ref_rejected"]
    )


def preference_metrics(model: nn.Module, loader: DataLoader, beta: float = 0.1) -> dict[str, float]:
    """`reward_metrics` of `model` on the pairs of `loader` (which carry the reference's log-probs)."""
    return reward_metrics(pair_scores(model, loader), beta)


def reward_metrics(scores: dict[str, torch.Tensor], beta: float = 0.1) -> dict[str, float]:
    """Held-out figures of a policy from its `pair_scores`: `reward_accuracy` (share of pairs whose chosen answer
    gets the higher implicit reward; a tie counts half, so the reference itself scores 0.5), `reward_margin` (mean
    reward difference), `logp_chosen` and `logp_rejected` (mean summed log-probs), and `eval_loss` (DPO's loss at
    this beta)."""
    chosen, rejected = implicit_rewards(scores, beta)
    margin = chosen - rejected
    return {
        "reward_accuracy": float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean()),
        "reward_margin": float(margin.mean()),
        "logp_chosen": float(scores["chosen"].mean()),
        "logp_rejected": float(scores["rejected"].mean()),
        "eval_loss": float(-F.logsigmoid(margin).mean()),
    }


@torch.no_grad()
def answer_kl(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    sources: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
) -> float:
    """KL(policy || reference) per answer token, in nats: at every position of the given answers (the policy's
    own), the exact KL between the two next-token distributions over the whole vocabulary, averaged over the
    answer tokens. It reads the policy's greedy path rather than samples, so it is an estimate, not the KL of
    the sequence distribution; 0 when the two models agree."""
    check_positive("batch_size", batch_size)
    rows = [encode_pair(tokenizer, s, a) for s, a in zip(sources, answers, strict=True)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    collate = pad_collate(pad_id, IGNORE_INDEX)
    device = next(policy.parameters()).device
    modes = policy.training, reference.training
    policy.eval()
    reference.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        log_p = F.log_softmax(policy(**inputs).logits[:, :-1][mask].float(), dim=-1)
        log_q = F.log_softmax(reference(**inputs).logits[:, :-1][mask].float(), dim=-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        count += int(mask.sum())
    policy.train(modes[0])
    reference.train(modes[1])
    if count == 0:
        raise MfkitError("No answer tokens to compare.", "pass non-empty answers.")
    return total / count


def is_archaic(word: str, previous: str = "") -> bool:
    """An old form Basic English replaces: one of `ARCHAIC_WORDS`, a verb in -eth (he goeth, it cometh), or the
    second person in -est after thou (thou knowest; superlatives such as greatest stay modern)."""
    if word in ARCHAIC_WORDS:
        return True
    if len(word) >= 5 and word.endswith("eth") and word not in NOT_ARCHAIC_ETH:
        return True
    return previous == "thou" and word.endswith(("est", "st"))


def archaic_rate(texts: Iterable[str]) -> float:
    """Share of the words in `texts` that are archaic (`is_archaic`), over all their words (0 when none)."""
    archaic = total = 0
    for text in texts:
        words = _WORD.findall(text.lower())
        total += len(words)
        archaic += sum(is_archaic(w, p) for p, w in zip(["", *words[:-1]], words, strict=True))
    return archaic / total if total else 0.0
