"""Few-shot helpers: drawing examples, chat prompts, cached label-word scoring, calibration, the embedding probe.

Everything runs on tiny random models and a word-level tokenizer (a few seconds in all).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mfkit import fewshot as fs
from mfkit.errors import MfkitError
from mfkit.prompting import chat_prompt, continuation_logprobs

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "<pad>",
    "<unk>",
    "system",
    "user",
    "assistant",
    "free",
    "money",
    "now",
    "meeting",
    "at",
    "noon",
    "see",
    "you",
    "the",
    "report",
    "spam",
    "ham",
    "very",
    "Yes",
    "No",
    "A",
    "B",
    "is",
    "this",
    "?",
    "N/A",
    "[MASK]",
    "Email",
    ":",
    "Answer",
    "or",
    "email",
    ".",
]
TEMPLATE = fs.Template("test", "Answer spam or ham .", "Email : {text}", ("ham", "spam"))
MULTI = fs.Template("multi", None, "{text}", ("ham", "very spam"))
TEXTS = ["free money now", "see you at the meeting", "the report at noon", "free free money", "meeting now"]


@pytest.fixture(scope="module")
def tokenizer():
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


# ---- shortening and drawing ------------------------------------------------------------------------------------


def test_shorten_flattens_whitespace_and_cuts_at_a_word():
    assert fs.shorten("  Hello\n\n  world\t! ", 100) == "Hello world !"
    cut = fs.shorten("alpha beta gamma delta epsilon", 17)
    assert len(cut) <= 17 and cut.endswith("…") and cut.startswith("alpha beta")
    assert fs.shorten(None, 10) == ""
    with pytest.raises(MfkitError):
        fs.shorten("x", 0)


LABELS = [0] * 30 + [1] * 8


def test_draw_shots_is_balanced_seeded_and_nested():
    labels = np.array(LABELS)
    for k in (1, 2, 4, 8):
        rows = fs.draw_shots(LABELS, k, seed=3, draw=1)
        assert len(rows) == 2 * k == len(set(rows))
        assert np.bincount(labels[rows], minlength=2).tolist() == [k, k]
        assert rows == fs.draw_shots(LABELS, k, seed=3, draw=1)
    assert fs.draw_shots(LABELS, 4, seed=3, draw=0) != fs.draw_shots(LABELS, 4, seed=3, draw=1)
    for small, large in ((1, 2), (2, 4), (4, 8)):
        assert set(fs.draw_shots(LABELS, small, 0, 2)) <= set(fs.draw_shots(LABELS, large, 0, 2))
    assert fs.draw_shots(LABELS, 0) == []


def test_draw_shots_shuffles_the_order_and_checks_k():
    orders = {tuple(np.array(LABELS)[fs.draw_shots(LABELS, 4, seed=0, draw=d)]) for d in range(10)}
    assert len(orders) > 1  # the classes do not always come in the same blocks
    with pytest.raises(MfkitError, match="fewer than"):
        fs.draw_shots(LABELS, 9)
    with pytest.raises(MfkitError, match="examples per class"):
        fs.draw_shots(LABELS, -1)


def test_drawn_rows_is_the_union_of_the_grid():
    rows = fs.drawn_rows(LABELS, (0, 1, 4), draws=3, seed=5)
    expected = {i for k in (1, 4) for d in range(3) for i in fs.draw_shots(LABELS, k, 5, d)}
    assert rows == sorted(expected)
    assert fs.draws_for(0, 3) == 1 and fs.draws_for(2, 3) == 3


# ---- templates and prompts -------------------------------------------------------------------------------------


def test_templates_are_found_by_name():
    assert [t.name for t in fs.get_templates(["yes-no", "spam-ham"])] == ["yes-no", "spam-ham"]
    assert fs.get_templates("spam-ham")[0].label_words == ("ham", "spam")
    with pytest.raises(MfkitError, match="template"):
        fs.get_templates(["nope"])
    assert fs.TEMPLATES["spam-ham"].user_turn("a {curly} mail") == "a {curly} mail"


def test_messages_alternate_examples_and_answers():
    messages = fs.fewshot_messages(TEMPLATE, [("free money", 1), ("see you", 0)], "the report")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in messages[2::2]] == ["spam", "ham"]
    assert messages[-1]["content"] == "Email : the report"
    with pytest.raises(MfkitError, match="label word"):
        fs.fewshot_messages(TEMPLATE, [("x", 2)], "y")


def test_zero_shot_prompt_is_the_one_turn_chat_prompt(tokenizer):
    assert fs.fewshot_prompt(tokenizer, TEMPLATE, [], "free money") == chat_prompt(
        tokenizer, "Email : free money", system="Answer spam or ham ."
    )


def test_split_prompts_share_one_prefix(tokenizer):
    shots = [("free money", 1), ("see you", 0)]
    prefix, suffixes = fs.split_prompts(tokenizer, TEMPLATE, shots, TEXTS[:3])
    for text, suffix in zip(TEXTS[:3], suffixes, strict=True):
        assert prefix + suffix == fs.fewshot_prompt(tokenizer, TEMPLATE, shots, text)
        assert suffix.startswith("<|im_start|>user")
    assert prefix.endswith("<|im_end|>\n")
    assert fs.split_prompts(tokenizer, MULTI, [], ["x"])[0] == ""  # no system, no examples: nothing shared


# ---- scoring ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [TEMPLATE, MULTI])
def test_cached_scores_equal_whole_prompt_scores(lm, tokenizer, template):
    for shots in ([], [("free money", 1), ("see you at noon", 0), ("money now", 1)]):
        prefix, suffixes = fs.split_prompts(tokenizer, template, shots, TEXTS)
        cached = fs.score_shared_prefix(lm, tokenizer, prefix, suffixes, template.label_words)
        whole = continuation_logprobs(
            lm, tokenizer, [prefix + s for s in suffixes], template.label_words, batch_size=1
        )
        np.testing.assert_allclose(cached, whole, rtol=1e-4, atol=1e-4)
        # The cache is cut back after every suffix: scoring in another order gives the same numbers.
        again = fs.score_shared_prefix(lm, tokenizer, prefix, suffixes[::-1], template.label_words)
        np.testing.assert_allclose(again[::-1], cached, rtol=1e-5, atol=1e-5)


def test_scoring_refuses_long_prompts_and_bad_splits(lm, tokenizer):
    prefix, suffixes = fs.split_prompts(tokenizer, TEMPLATE, [("free money", 1)], TEXTS)
    with pytest.raises(MfkitError, match="max_context_tokens"):
        fs.score_shared_prefix(lm, tokenizer, prefix, suffixes, ("ham", "spam"), max_context_tokens=10)
    with pytest.raises(MfkitError, match="tokenize differently"):
        fs.score_shared_prefix(lm, tokenizer, "free", ["money"], ("ham", "spam"))
    with pytest.raises(MfkitError, match="Nothing to score"):
        fs.score_shared_prefix(lm, tokenizer, prefix, [], ("ham", "spam"))


def test_contextual_calibration_divides_by_the_content_free_prior():
    scores = np.log([[0.6, 0.4], [0.3, 0.1]])  # the second row is not normalised: only ratios matter
    free = np.log([[0.8, 0.2], [0.8, 0.2]])
    q = np.exp(fs.contextual_calibration(scores, free))
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    np.testing.assert_allclose(q[0], np.array([0.75, 2.0]) / 2.75)  # 0.6/0.8 : 0.4/0.2
    uniform = fs.contextual_calibration(scores, np.zeros((1, 2)))
    assert (uniform.argmax(axis=1) == scores.argmax(axis=1)).all()
    with pytest.raises(MfkitError, match="do not match"):
        fs.contextual_calibration(scores, np.zeros((1, 3)))


# ---- the probe -------------------------------------------------------------------------------------------------


def test_mean_pool_ignores_padding():
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = fs.mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(dim=0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(dim=0))


def test_embeddings_are_unit_length_and_independent_of_the_batch(tokenizer):
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    together = fs.embed_texts(encoder, tokenizer, TEXTS, batch_size=4)
    alone = np.stack([fs.embed_texts(encoder, tokenizer, [t])[0] for t in TEXTS])
    assert together.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def fake_features(labels, dim=8, seed=0, noise=0.3):
    """Class 1 lives near +e_0, class 0 near -e_0."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    x = rng.normal(scale=noise, size=(len(labels), dim))
    x[:, 0] += np.where(labels == 1, 1.0, -1.0)
    return x


def test_probe_learns_separable_features_and_needs_two_classes():
    labels = [0, 1] * 4
    probe = fs.fit_probe(fake_features(labels), labels)
    test_labels = [0, 1] * 20
    assert (probe.predict(fake_features(test_labels, seed=1)) == test_labels).mean() > 0.9
    with pytest.raises(MfkitError, match="single class"):
        fs.fit_probe(fake_features([1, 1]), [1, 1])


def test_run_probe_uses_the_drawn_rows():
    features = fake_features(LABELS)
    eval_labels = [0, 1] * 10
    frame = fs.run_probe(
        dict(enumerate(features)),
        LABELS,
        fake_features(eval_labels, seed=2),
        eval_labels,
        shots=(0, 1, 4),
        draws=2,
        seed=1,
        name="fake",
    )
    assert len(frame) == 4 and set(frame["k"]) == {1, 4} and set(frame["method"]) == {"probe"}
    assert (frame["template"] == "fake").all() and (frame["f1"] > 0.8).all()
    with pytest.raises(MfkitError, match="No features"):
        fs.run_probe({0: features[0]}, LABELS, features, LABELS, shots=(1,), draws=1)


# ---- the grid --------------------------------------------------------------------------------------------------


def test_run_icl_grid_and_summary(lm, tokenizer):
    pool = [TEXTS[i % len(TEXTS)] for i in range(len(LABELS))]
    args = (lm, tokenizer, [TEMPLATE, MULTI], pool, LABELS, TEXTS, [1, 0, 0, 1, 0], (0, 2))
    frame = fs.run_icl(*args, draws=2, seed=0, max_context_tokens=200)
    assert len(frame) == 2 * (1 + 2) * 2  # templates x (k=0 once, k=2 twice) x (raw, calibrated)
    assert set(frame["method"]) == {"icl", "icl-calibrated"}
    assert {"accuracy", "f1", "positive_share", "prior_positive", "prefix_tokens"} <= set(frame.columns)
    assert frame["prior_positive"].between(0, 1).all()
    again = fs.run_icl(*args, draws=2, seed=0, max_context_tokens=200)
    np.testing.assert_allclose(frame["f1"], again["f1"])

    summary = fs.summarize(frame)
    zero = summary[(summary["k"] == 0)]
    assert (zero["draws"] == 1).all() and (zero["f1_std"] == 0).all()
    two = summary[(summary["k"] == 2) & (summary["method"] == "icl") & (summary["template"] == "test")].iloc[
        0
    ]
    runs = frame[(frame["k"] == 2) & (frame["method"] == "icl") & (frame["template"] == "test")]["f1"]
    assert two["draws"] == 2
    assert two["f1"] == pytest.approx(runs.mean()) and two["f1_std"] == pytest.approx(runs.std(ddof=1))
