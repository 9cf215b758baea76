"""Preference alignment: the four losses against hand-computed values, the reference cache, the pair builder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mfkit import preference as pref
from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.training import TrainConfig, fit

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS = ["user", "assistant", "thou", "art", "you", "are", "ye", "shall", "go", "unto", "the", "city"]
WORDS += ["lo", "see", "a", "big", "rock", "he", "saith", "says", "greatest"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
VERSES = [  # (KJV source, BBE reference)
    ("thou art", "you are"),
    ("ye shall go unto the city", "you will go to the city"),
    ("lo a big rock", "see a big rock"),
    ("he saith go", "he says go"),
]


@pytest.fixture(scope="module")
def tokenizer():
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tok.chat_template = TEMPLATE
    return tok


def tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    seed_everything(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=16, n_layer=1, n_head=2, bos_token_id=2
    )
    config.eos_token_id, config.resid_pdrop, config.embd_pdrop, config.attn_pdrop = 2, 0.0, 0.0, 0.0
    return GPT2LMHeadModel(config)


def pair_data(tokenizer) -> Dataset:
    sources = [s for s, _ in VERSES]
    return pref.preference_pairs(tokenizer, sources, [t for _, t in VERSES], sources, kind="copy")


# --------------------------------------------------------------------------------------------------------------
# The losses by hand: one pair, policy log-probs (-2, -5), reference (-3, -4), beta 0.5


def test_dpo_loss_matches_the_formula_by_hand():
    # margin = (-2 - -3) - (-5 - -4) = 1 - (-1) = 2; loss = -log sigmoid(0.5 * 2) = log(1 + e^-1)
    loss = pref.dpo_loss(*map(torch.tensor, ([-2.0], [-5.0], [-3.0], [-4.0])), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_ipo_loss_matches_the_formula_by_hand():
    # margin 2, target 1 / (2 * 0.5) = 1: loss = (2 - 1)^2 = 1
    loss = pref.ipo_loss(*map(torch.tensor, ([-2.0], [-5.0], [-3.0], [-4.0])), beta=0.5)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_simpo_loss_matches_the_formula_by_hand():
    # mean log-probs -0.5 and -1.5: -log sigmoid(2 * 1 - 0.5) = log(1 + e^-1.5)
    loss = pref.simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)


def test_orpo_loss_matches_the_formula_by_hand():
    # p_w = e^-0.5, p_l = e^-1.5; odds p / (1 - p); loss = NLL + beta * -log sigmoid(log odds_w - log odds_l)
    p_w, p_l = math.exp(-0.5), math.exp(-1.5)
    ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    expected = 0.7 + 0.1 * math.log(1 + math.exp(-ratio))
    loss = pref.orpo_loss(torch.tensor(0.7), torch.tensor([-0.5]), torch.tensor([-1.5]), beta=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_is_log_2_and_ipo_its_constant_when_policy_and_reference_agree(beta):
    """Equal log-ratios: DPO's margin is 0, so its loss is -log sigmoid(0) = log 2 whatever beta; IPO's is
    (0 - 1 / (2 beta))^2 = 1 / (4 beta^2)."""
    chosen, rejected = torch.tensor([-7.0, -1.2]), torch.tensor([-3.0, -9.5])
    assert pref.dpo_loss(chosen, rejected, chosen, rejected, beta).item() == pytest.approx(math.log(2))
    assert pref.ipo_loss(chosen, rejected, chosen, rejected, beta).item() == pytest.approx(1 / (4 * beta**2))


def test_simpo_uses_the_per_token_mean_so_length_alone_does_not_decide(tokenizer):
    """Two answers with the same per-token log-prob but different lengths: their sums differ, their means do not,
    so SimPO sees a zero margin (its loss is -log sigmoid(-gamma)) where a summed margin would not be zero."""
    model = tiny_gpt2(len(tokenizer))
    row = pref.encode_preference(tokenizer, "thou art", "you are", "you are you are you are")
    batch = pref.preference_collate(0)([row])
    sums, counts = pref.answer_logps(model, batch)
    assert counts.tolist() == [3, 7]  # the answers' tokens and their end-of-turn token
    means = sums / counts
    expected = pref.simpo_loss(means[:1], means[1:], beta=2.0, gamma=0.5)
    summed = pref.simpo_loss(sums[:1], sums[1:], beta=2.0, gamma=0.5)
    assert abs(expected.item() - summed.item()) > 1e-3  # the normalization changes the loss
    assert pref.PreferenceLoss("simpo", beta=2.0, gamma=0.5)(model, batch).item() == pytest.approx(
        expected.item()
    )
    equal = torch.tensor([-1.0])
    assert pref.simpo_loss(equal, equal, beta=2.0, gamma=0.5).item() == pytest.approx(
        math.log(1 + math.exp(0.5))
    )


def test_answer_logps_sum_only_the_answer_tokens(tokenizer):
    model = tiny_gpt2(len(tokenizer)).eval()
    row = pref.encode_preference(tokenizer, "thou art", "you are", "thou art")
    batch = pref.preference_collate(0)([row])
    sums, counts = pref.answer_logps(model, batch)
    ids = torch.tensor(row["chosen_input_ids"])
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], dim=-1)
    answer = [t for t, label in enumerate(row["chosen_labels"]) if label != -100]
    by_hand = sum(logp[t - 1, ids[t]].item() for t in answer)
    assert counts[0].item() == len(answer)
    assert sums[0].item() == pytest.approx(by_hand, abs=1e-5)


def test_answer_batches_label_the_chosen_half_and_embed_each_answer_at_its_last_token(tokenizer):
    from mfkit.representations import embed

    model = tiny_gpt2(len(tokenizer)).eval()
    tokenized = pref.tokenize_preferences(pair_data(tokenizer), tokenizer, 64)
    loader = pref.preference_loader(tokenized, tokenizer, batch_size=3, shuffle=False)
    vectors, labels = embed(model, pref.answer_batches(loader), how="last")
    assert labels.tolist()[:6] == [1, 1, 1, 0, 0, 0] and len(vectors) == 2 * len(tokenized)
    row = tokenized[0]  # its chosen answer alone, unpadded: the state at its last token
    with torch.no_grad():
        hidden = model(
            input_ids=torch.tensor([row["chosen_input_ids"]]), output_hidden_states=True
        ).hidden_states
    assert torch.allclose(torch.from_numpy(vectors[0]), hidden[-1][0, -1], atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The reference cache, the loss on the kit's loop


def test_cached_reference_equals_a_fresh_pass_and_dpo_starts_at_log_2(tokenizer):
    policy = tiny_gpt2(len(tokenizer))
    reference = copy.deepcopy(policy).eval()
    tokenized = pref.with_reference_logps(
        pref.tokenize_preferences(pair_data(tokenizer), tokenizer, 64), reference, tokenizer, batch_size=3
    )
    loader = pref.preference_loader(tokenized, tokenizer, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    with torch.no_grad():
        fresh, _ = pref.answer_logps(reference, batch)
    assert torch.allclose(batch["ref_logps"], fresh.float(), atol=1e-5)
    with torch.no_grad():
        assert pref.PreferenceLoss("dpo")(policy, batch).item() == pytest.approx(math.log(2), abs=1e-5)
        assert pref.PreferenceLoss("ipo", beta=0.1)(policy, batch).item() == pytest.approx(25.0, abs=1e-3)
    assert pref.preference_metrics(policy, loader)["reward_accuracy"] == 0.5  # all ties before training


@pytest.mark.parametrize("method", pref.METHODS)
def test_every_method_trains_on_fit_and_dpo_prefers_the_chosen(tokenizer, method):
    policy = tiny_gpt2(len(tokenizer))
    reference = copy.deepcopy(policy).eval()
    tokenized = pref.tokenize_preferences(pair_data(tokenizer), tokenizer, 64)
    tokenized = pref.with_reference_logps(tokenized, reference, tokenizer)
    loader = pref.preference_loader(tokenized, tokenizer, batch_size=4, shuffle=False)
    before = pref.preference_metrics(policy, loader, beta=0.5)
    history = fit(
        policy,
        loader,
        TrainConfig(max_steps=15, lr=1e-2, warmup=0, progress=False, cpu=True),
        loss_fn=(loss := pref.PreferenceLoss(method, beta=0.5)),
    )
    after = pref.preference_metrics(policy, loader, beta=0.5)
    assert history.steps == 15 and all(math.isfinite(p["loss"]) for p in history.train)
    trace = loss.trace_frame()
    assert (
        list(trace["step"]) == list(range(1, 16))
        and trace[["logp_chosen", "logp_rejected"]].notna().all().all()
    )
    if method in ("dpo", "ipo"):
        assert after["reward_margin"] > before["reward_margin"] and after["reward_accuracy"] == 1.0


def test_dpo_without_cached_reference_says_how_to_add_it(tokenizer):
    tokenized = pref.tokenize_preferences(pair_data(tokenizer), tokenizer, 64)
    batch = next(iter(pref.preference_loader(tokenized, tokenizer, batch_size=2)))
    with pytest.raises(MfkitError, match="with_reference_logps"):
        pref.PreferenceLoss("dpo")(tiny_gpt2(len(tokenizer)), batch)
    with pytest.raises(MfkitError, match="method"):
        pref.PreferenceLoss("ppo")


def test_kl_to_the_reference_is_zero_for_the_same_model(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    other = tiny_gpt2(len(tokenizer))
    with torch.no_grad():
        other.lm_head.weight.mul_(3)
    sources, answers = ["thou art", "lo a big rock"], ["you are", "see a rock"]
    assert pref.answer_kl(model, model, tokenizer, sources, answers) == pytest.approx(0.0, abs=1e-6)
    assert pref.answer_kl(model, other, tokenizer, sources, answers) > 0


# --------------------------------------------------------------------------------------------------------------
# The data


def test_pairs_are_in_the_standard_form_and_drop_rejected_equal_to_chosen(tokenizer):
    pairs = pref.preference_pairs(
        tokenizer,
        ["thou art", "lo a big rock"],
        ["you are", "see a big rock"],
        ["you are", "lo a big rock"],
        "x",
    )
    assert pairs.column_names == list(pref.PAIR_COLUMNS)
    assert pairs["rejected"] == ["lo a big rock"]  # the pair whose rejected answer is the chosen one is gone
    assert pairs["prompt"][0].endswith("<|im_start|>assistant ")


def test_held_out_verses_never_include_excluded_training_or_evaluation_verses():
    rows = [(f"verse {i} text", f"target {i}") for i in range(40)]
    split = Dataset.from_dict({"source": [s for s, _ in rows], "target": [t for _, t in rows]})
    trained = split.select(range(0, 10))  # as 06's training verses
    evaluated = Dataset.from_dict({"source": ["VERSE 12   text", "verse 13 text"]})  # other case and spacing
    picked = pref.held_out_verses(split, 20, seed=3, exclude=[trained, evaluated])
    banned = set(trained["source"]) | {"verse 12 text", "verse 13 text"}
    assert len(picked) == 20 and not set(picked["source"]) & banned
    with pytest.raises(MfkitError, match="outside the excluded"):
        pref.held_out_verses(split, 30, exclude=[trained, evaluated])


def test_archaic_rate_counts_old_forms_not_superlatives():
    assert pref.archaic_rate(["Thou knowest, he saith unto ye"]) == pytest.approx(5 / 6)  # all but "he"
    assert pref.archaic_rate(["he cometh"]) == pytest.approx(1 / 2)
    assert pref.archaic_rate(["the greatest teeth of Nazareth", "you are"]) == 0.0
    assert pref.archaic_rate([]) == 0.0
