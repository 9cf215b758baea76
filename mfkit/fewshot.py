"""The same few labels used two ways: in-context learning with a causal LM, and a probe on frozen embeddings.

In-context learning (ICL) updates no weight. The k labelled examples of each class become earlier turns of a chat
(an email from the user, the right one-word verdict from the assistant), and they condition the next-token
distribution at the point where the assistant answers for a new email. That answer is read as the log-likelihood
of each label word (see `mfkit.prompting`), never generated. The probe uses the same examples the classical way:
a frozen sentence encoder turns every email into one vector (the mean of its token vectors) and a logistic
regression is fitted on the 2k vectors.

    shorten(...)                    emails cut to a few hundred characters, so many-shot prompts stay short
    draw_shots(...), drawn_rows()   k examples per class from the train split: balanced, seeded, nested in k
    Template, TEMPLATES             prompt wordings: instruction, user turn, one label word per class
    fewshot_messages/_prompt(...)   the k-shot conversation and its rendering by the model's chat template
    split_prompts(...)              the part every email shares (instruction + examples) and each email's own part
    score_shared_prefix(...)        label-word log-likelihoods; the shared part runs once, then sits in a KV cache
    contextual_calibration(...)     Zhao et al. (2021): divide by the label probabilities of content-free inputs
    mean_pool(...), embed_texts()   frozen-encoder sentence embeddings
    fit_probe(...)                  L2-regularised logistic regression on the examples' embeddings
    run_icl(...), run_probe(...)    the whole grid (template x k x draw): one row of scores per run
    summarize(...)                  mean and standard deviation over draws
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .errors import MfkitError, check_positive
from .loaders import make_loader, pad_collate
from .metrics import classification_scores, softmax

# The content-free inputs of Zhao et al. (2021): each says nothing about either class.
CONTENT_FREE = ("N/A", "", "[MASK]")
METRICS = ("accuracy", "precision", "recall", "f1", "macro_f1")


# --------------------------------------------------------------------------------------------------------------
# Examples: shortening and drawing
# --------------------------------------------------------------------------------------------------------------


def shorten(text: str, max_chars: int) -> str:
    """`text` with every whitespace run made one space, cut to at most `max_chars` characters.

    The cut falls at the last word boundary before the limit (unless that would drop most of the text), and an
    ellipsis marks it, so the model can tell an email was cut rather than ended.
    """
    check_positive("max_chars", max_chars)
    flat = " ".join((text or "").split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[: max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut + "…"


def draw_shots(
    labels: Sequence[int], k: int, seed: int = 0, draw: int = 0, num_classes: int | None = None
) -> list[int]:
    """Row indices of `k` examples of every class (2k rows for two classes), in a shuffled order.

    Balanced: each class gets exactly `k` rows, whatever its share of the data. Seeded: `(seed, draw)` fixes the
    rows, and different `draw` numbers give independent draws. Nested: for one `(seed, draw)`, the rows of a
    smaller k are among those of a larger k (each class's rows are the first k of one fixed permutation), so a
    curve over k changes one thing at a time. The order is shuffled too, so the classes interleave in a prompt
    instead of arriving in two blocks.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise MfkitError(f"k={k!r} is not a number of examples per class.", "use a whole number >= 0.")
    labels = np.asarray(labels)
    classes = range(num_classes) if num_classes is not None else np.unique(labels)
    rng = np.random.default_rng([seed, draw])
    chosen: list[int] = []
    for cls in classes:
        rows = np.flatnonzero(labels == cls)
        if len(rows) < k:
            raise MfkitError(
                f"Class {cls} has {len(rows)} rows, fewer than the k={k} examples per class asked for.",
                "use a smaller k, or draw from a split with more rows of that class.",
            )
        chosen.extend(rng.permutation(rows)[:k].tolist())
    order = np.random.default_rng([seed, draw, k]).permutation(len(chosen))
    return [chosen[i] for i in order]


def draws_for(k: int, draws: int) -> int:
    """How many draws k needs: one for k = 0 (there is nothing to draw), `draws` otherwise."""
    return 1 if k == 0 else draws


def drawn_rows(labels: Sequence[int], shots: Sequence[int], draws: int, seed: int = 0) -> list[int]:
    """Every row any (k, draw) of the grid uses, sorted: the only training rows that need embedding."""
    return sorted(
        {i for k in shots for d in range(draws_for(k, draws)) for i in draw_shots(labels, k, seed, d)}
    )


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One wording of the task: a system instruction, the user turn around an email, one label word per class.

    `system=None` keeps the chat template's default system message. `label_words[c]` is the assistant's whole
    answer for class c (class 0 is ham, 1 is spam); the words are scored, not generated.
    """

    name: str
    system: str | None
    user: str
    label_words: tuple[str, ...]

    def user_turn(self, text: str) -> str:
        """The user's message for one email (`{text}` in `user` is replaced; braces inside the email are safe)."""
        return self.user.format(text=text)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "spam-ham",
            "You filter email. Spam is unsolicited bulk or advertising mail; ham is any other email. "
            "Answer with one word: spam or ham.",
            "{text}",
            ("ham", "spam"),
        ),
        Template(
            "yes-no",
            None,
            "Is this email spam? Answer Yes or No.\n\n{text}",
            ("No", "Yes"),
        ),
        Template(
            "folder-a-b",
            "You sort incoming email into two folders: A for normal email, B for spam. "
            "Answer with the folder letter only.",
            "Email: {text}",
            ("A", "B"),
        ),
    )
}


def get_templates(names: Sequence[str] | str) -> list[Template]:
    """The templates called `names` (a single name is allowed), in that order."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in TEMPLATES]
    if unknown or not names:
        raise MfkitError(
            f"Unknown or no template name(s): {unknown or names}.", f"use names from {list(TEMPLATES)}."
        )
    return [TEMPLATES[n] for n in names]


def fewshot_messages(
    template: Template, shots: Sequence[tuple[str, int]], query: str
) -> list[dict[str, str]]:
    """The chat of a k-shot prompt: [system], then per example a user turn and the assistant's label word, then
    the user turn of `query`. `shots` holds (text, class id) pairs."""
    messages = [{"role": "system", "content": template.system}] if template.system else []
    for text, label in shots:
        if not 0 <= label < len(template.label_words):
            raise MfkitError(
                f"Example label {label!r} has no label word in template {template.name!r}.",
                f"use class ids 0..{len(template.label_words) - 1}.",
            )
        messages.append({"role": "user", "content": template.user_turn(text)})
        messages.append({"role": "assistant", "content": template.label_words[label]})
    messages.append({"role": "user", "content": template.user_turn(query)})
    return messages


def _check_chat(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise MfkitError(
            "This tokenizer has no chat template.", "use an instruction-tuned model such as smollm2-135m."
        )


def fewshot_prompt(tokenizer: Any, template: Template, shots: Sequence[tuple[str, int]], query: str) -> str:
    """The k-shot prompt as text, rendered by the model's chat template and ending where the answer starts.

    With no shots this is `mfkit.prompting.chat_prompt(tokenizer, template.user_turn(query), template.system)`.
    """
    _check_chat(tokenizer)
    messages = fewshot_messages(template, shots, query)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def split_prompts(
    tokenizer: Any, template: Template, shots: Sequence[tuple[str, int]], queries: Sequence[str]
) -> tuple[str, list[str]]:
    """(shared prefix, one suffix per query): prefix + suffix is exactly `fewshot_prompt(..., query)`.

    The prefix is the rendered conversation before the last user turn (instruction and examples), identical for
    every query; a scorer can run it once and keep its keys and values. It ends after a complete turn, so it
    tokenizes the same alone as inside the whole prompt (`score_shared_prefix` checks this).
    """
    _check_chat(tokenizer)
    earlier = fewshot_messages(template, shots, "")[:-1]
    prefix = tokenizer.apply_chat_template(earlier, tokenize=False) if earlier else ""
    suffixes = []
    for query in queries:
        full = fewshot_prompt(tokenizer, template, shots, query)
        if not full.startswith(prefix):
            raise MfkitError(
                "This chat template does not render the earlier turns as a prefix of the whole prompt.",
                "score whole prompts with mfkit.prompting.continuation_logprobs instead.",
            )
        suffixes.append(full[len(prefix) :])
    return prefix, suffixes


# --------------------------------------------------------------------------------------------------------------
# Scoring label words with a shared prefix
# --------------------------------------------------------------------------------------------------------------


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@torch.no_grad()
def score_shared_prefix(
    model: nn.Module,
    tokenizer: Any,
    prefix: str,
    suffixes: Sequence[str],
    label_words: Sequence[str],
    max_context_tokens: int | None = None,
    progress: Any = None,
) -> np.ndarray:
    """log p(label word | prefix + suffix) for every suffix and label word: an array [len(suffixes), len(words)].

    The same numbers as `mfkit.prompting.continuation_logprobs(model, tokenizer, [prefix + s for s in suffixes],
    label_words)`, computed faster when many prompts share a long prefix: the prefix is run once and its keys and
    values are kept in a KV cache; each suffix then runs on top of the cache, and the cache is cut back to the
    prefix afterwards. A label word of several tokens costs one more short forward on the cache.

    Prompts longer than `max_context_tokens` raise an error rather than being cut silently. `progress` is an
    optional tqdm bar, advanced by one per suffix.
    """
    from transformers import DynamicCache

    if not suffixes or not label_words:
        raise MfkitError("Nothing to score.", "pass at least one suffix and one label word.")
    prefix_ids = _ids(tokenizer, prefix, special=True)
    suffix_ids = [_ids(tokenizer, s, special=False) for s in suffixes]
    word_ids = [_ids(tokenizer, w, special=False) for w in label_words]
    if any(not ids for ids in suffix_ids) or any(not ids for ids in word_ids):
        raise MfkitError(
            "A suffix or a label word encodes to no tokens.", "use non-empty prompts and label words."
        )
    if _ids(tokenizer, prefix + suffixes[0], special=True) != prefix_ids + suffix_ids[0]:
        raise MfkitError(
            "The prefix and the suffix tokenize differently apart than together.",
            "split prompts after a complete chat turn (split_prompts does), or use continuation_logprobs.",
        )
    longest = len(prefix_ids) + max(map(len, suffix_ids)) + max(map(len, word_ids)) - 1
    if max_context_tokens and longest > max_context_tokens:
        raise MfkitError(
            f"The longest prompt needs {longest} tokens, more than max_context_tokens={max_context_tokens}.",
            "shorten the emails (MAX_CHARS), use fewer shots, or raise MAX_CONTEXT_TOKENS (at most the model's "
            "context length).",
        )
    device = next(model.parameters()).device
    # Only the last position's logits are needed: skip the output layer elsewhere where the model allows it.
    accepted = inspect.signature(model.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    # transformers 5.25 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40)
    cache_name = "cache" if "cache" in accepted else "past_key_values"

    def run(ids: list[int], **kw: Any) -> torch.Tensor:
        kw[cache_name] = cache
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, **kw)
        return F.log_softmax(out.logits[0].float(), dim=-1)

    was_training = model.training
    model.eval()
    cache = DynamicCache()
    if prefix_ids:
        run(prefix_ids, **last_only)
    scores = np.zeros((len(suffixes), len(word_ids)))
    for i, ids in enumerate(suffix_ids):
        next_token = run(ids, **last_only)[-1]  # the distribution of the answer's first token
        for j, word in enumerate(word_ids):
            total = next_token[word[0]].item()
            if len(word) > 1:  # token t of the word is predicted after its tokens < t
                later = run(word[:-1])
                total += later[torch.arange(len(word) - 1), torch.tensor(word[1:])].sum().item()
                cache.crop(-(len(word) - 1))
            scores[i, j] = total
        cache.crop(-len(ids))  # back to the prefix alone
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return scores


def contextual_calibration(scores: np.ndarray, content_free_scores: np.ndarray) -> np.ndarray:
    """Calibrated log-probabilities of the labels (Zhao et al., 2021), an array like `scores`.

    `scores` [n, C] are label-word log-likelihoods; `content_free_scores` [m, C] the same for m inputs that carry
    no content ("N/A", ...). With p(y|x) the label words' probabilities renormalised over the C words, and p_cf the
    mean of those probabilities over the content-free inputs, the calibrated probabilities are
    q(y|x) ∝ p(y|x) / p_cf(y): a label the prompt favours whatever the email says is divided by that preference.
    """
    from scipy.special import log_softmax

    scores, free = np.asarray(scores, dtype=float), np.asarray(content_free_scores, dtype=float)
    if scores.ndim != 2 or free.ndim != 2 or scores.shape[1] != free.shape[1] or not len(free):
        raise MfkitError(
            f"scores {scores.shape} and content-free scores {free.shape} do not match.",
            "pass two 2-D arrays with one column per label word.",
        )
    prior = softmax(free).mean(axis=0)
    return log_softmax(log_softmax(scores, axis=1) - np.log(prior), axis=1)


# --------------------------------------------------------------------------------------------------------------
# The probe: frozen sentence embeddings + logistic regression
# --------------------------------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token vectors `hidden` [b, t, d] over the real tokens (`mask` [b, t] is 1 there): [b, d]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 256,
    normalize: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Sentence embeddings [len(texts), d] from a frozen encoder: mean-pooled last hidden states, L2-normalised.

    This is how all-MiniLM-L6-v2 was trained to embed a sentence (the mean of its token vectors, unit length).
    Texts are cut at `max_length` tokens; batches are padded to their own longest text and the padding is left
    out of the mean.
    """
    from tqdm.auto import tqdm

    if not texts:
        raise MfkitError("No texts to embed.", "pass at least one text.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise MfkitError("The tokenizer has no padding token.", "set tokenizer.pad_token before embedding.")
    encoded = tokenizer([t or "" for t in texts], truncation=True, max_length=max_length)
    rows = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
    loader = make_loader(rows, batch_size, pad_collate(tokenizer.pad_token_id), shuffle=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for batch in tqdm(loader, desc="embed", disable=not progress):
        batch = {key: value.to(device) for key, value in batch.items()}
        pooled = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        out.append((F.normalize(pooled, dim=-1) if normalize else pooled).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def fit_probe(features: np.ndarray, labels: Sequence[int], c: float = 1.0) -> Any:
    """A logistic regression p(y=1|e) = σ(w·e + b) fitted on embeddings, with an L2 penalty ||w||² / (2c)."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise MfkitError(
            "The probe's examples hold a single class.", "give it examples of at least two classes."
        )
    check_positive("c", c)
    return LogisticRegression(C=c, max_iter=1000).fit(np.asarray(features), labels)


# --------------------------------------------------------------------------------------------------------------
# The experiment grid
# --------------------------------------------------------------------------------------------------------------


def _scores_row(
    method: str, template: str, k: int, draw: int, labels: np.ndarray, preds: np.ndarray, positive: int
) -> dict[str, Any]:
    row = {"method": method, "template": template, "k": k, "draw": draw}
    row.update(classification_scores(labels, preds, positive=positive))
    row["positive_share"] = float(np.mean(preds == positive))
    return row


def run_icl(
    model: nn.Module,
    tokenizer: Any,
    templates: Sequence[Template],
    pool_texts: Sequence[str],
    pool_labels: Sequence[int],
    eval_texts: Sequence[str],
    eval_labels: Sequence[int],
    shots: Sequence[int],
    draws: int,
    seed: int = 0,
    max_context_tokens: int | None = None,
    content_free: Sequence[str] = CONTENT_FREE,
    positive: int = 1,
) -> pd.DataFrame:
    """In-context classification of `eval_texts` for every template, k in `shots` and draw (one for k = 0).

    The examples of draw d are `draw_shots(pool_labels, k, seed, d)`, the same for every template (and the same
    the probe gets), so templates differ only in wording. Each run scores the label words after every eval email
    and after the `content_free` inputs, and adds two rows: `icl` (the most likely label word) and
    `icl-calibrated` (after `contextual_calibration`). Columns: method, template, k, draw, the
    `classification_scores`, `positive_share` (how often the positive class is predicted) and `prior_positive`
    (the content-free probability of the positive label word), plus `prefix_tokens` (of the shared prefix).
    """
    from tqdm.auto import tqdm

    eval_labels = np.asarray(eval_labels)
    n_free = len(content_free)
    total = len(templates) * sum(draws_for(k, draws) for k in shots) * (len(eval_texts) + n_free)
    rows = []
    with tqdm(total=total, desc="in-context scoring", unit="prompt") as bar:
        for template in templates:
            for k in shots:
                for draw in range(draws_for(k, draws)):
                    examples = [
                        (pool_texts[i], int(pool_labels[i])) for i in draw_shots(pool_labels, k, seed, draw)
                    ]
                    prefix, suffixes = split_prompts(
                        tokenizer, template, examples, [*eval_texts, *content_free]
                    )
                    bar.set_postfix(template=template.name, k=k, draw=draw)
                    scores = score_shared_prefix(
                        model,
                        tokenizer,
                        prefix,
                        suffixes,
                        template.label_words,
                        max_context_tokens=max_context_tokens,
                        progress=bar,
                    )
                    real, free = scores[: len(eval_texts)], scores[len(eval_texts) :]
                    calibrated = contextual_calibration(real, free)
                    extra = {
                        "prior_positive": float(softmax(free).mean(axis=0)[positive]),
                        "prefix_tokens": len(_ids(tokenizer, prefix, special=True)),
                    }
                    for method, preds in (
                        ("icl", real.argmax(axis=1)),
                        ("icl-calibrated", calibrated.argmax(axis=1)),
                    ):
                        rows.append(
                            _scores_row(method, template.name, k, draw, eval_labels, preds, positive) | extra
                        )
    return pd.DataFrame(rows)


def run_probe(
    features_of: Mapping[int, np.ndarray],
    pool_labels: Sequence[int],
    eval_features: np.ndarray,
    eval_labels: Sequence[int],
    shots: Sequence[int],
    draws: int,
    seed: int = 0,
    c: float = 1.0,
    name: str = "probe",
    positive: int = 1,
) -> pd.DataFrame:
    """The probe on the same examples as `run_icl`: for every k >= 1 and draw, fit on the 2k drawn rows' features
    (`features_of[row]`, e.g. for the rows of `drawn_rows`) and score `eval_features`. k = 0 has no examples to
    fit and gives no row. Columns as in `run_icl`, with method "probe" and template `name`."""
    eval_labels = np.asarray(eval_labels)
    rows = []
    for k in shots:
        if k == 0:
            continue
        for draw in range(draws):
            picked = draw_shots(pool_labels, k, seed, draw)
            missing = [i for i in picked if i not in features_of]
            if missing:
                raise MfkitError(
                    f"No features for training rows {missing[:5]}.",
                    "embed every row of drawn_rows(pool_labels, shots, draws, seed).",
                )
            probe = fit_probe(
                np.stack([features_of[i] for i in picked]), [pool_labels[i] for i in picked], c=c
            )
            rows.append(
                _scores_row("probe", name, k, draw, eval_labels, probe.predict(eval_features), positive)
            )
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame, metrics: Sequence[str] = ("accuracy", "f1")) -> pd.DataFrame:
    """Mean and standard deviation over draws of each (method, template, k): columns `<metric>` and
    `<metric>_std`, plus `draws`. The std is the sample std (n - 1); with a single draw it is 0 (not measured)."""
    grouped = frame.groupby(["method", "template", "k"], sort=False)
    out = grouped[list(metrics)].mean()
    for metric in metrics:
        out[f"{metric}_std"] = grouped[metric].std(ddof=1).fillna(0.0)
    out["draws"] = grouped.size()
    return out.reset_index()
