"""augment: EDA operators (seeded, labels kept, edge cases), the robustness perturbations, pseudo-label selection,
the FGM loss (perturbation size, embeddings untouched, trains through fit) and the shipped synonym table."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mfkit import augment
from mfkit.errors import MfkitError
from mfkit.loaders import make_loader, pad_collate
from mfkit.training import TrainConfig, fit

SYNONYMS = {"cheap": ("inexpensive", "brassy"), "offer": ("proffer",), "money": ("cash",)}
MAIL = "Get cheap money now: our offer ends today, click here for the cheap offer!"


def test_shipped_table_loads_and_is_small():
    table = augment.load_synonyms()
    assert len(table) > 1000
    assert "inexpensive" in table["cheap"]
    assert all(isinstance(s, tuple) and s for s in list(table.values())[:50])
    assert (augment.data_dir() / augment.SYNONYMS_FILE).stat().st_size < 1_000_000


@pytest.mark.parametrize("operator", augment.OPERATORS)
def test_each_operator_is_deterministic_under_a_seed(operator):
    one = augment.eda(MAIL, random.Random(3), 0.2, operator, SYNONYMS)
    two = augment.eda(MAIL, random.Random(3), 0.2, operator, SYNONYMS)
    assert one == two
    others = {augment.eda(MAIL, random.Random(s), 0.2, operator, SYNONYMS) for s in range(20)}
    assert len(others) > 1  # the seed matters


def test_operators_do_what_they_say():
    words = MAIL.split()
    rng = random.Random(0)
    replaced = augment.synonym_replacement(words, 2, rng, SYNONYMS)
    assert len(replaced) == len(words)
    changed = [(a, b) for a, b in zip(words, replaced, strict=True) if a != b]
    assert len(changed) == 2
    assert all(b.strip(",!:").lower() in {"inexpensive", "brassy", "proffer", "cash"} for _, b in changed)
    assert ("offer!", "proffer!") in changed or all(
        not a.endswith("!") for a, _ in changed
    )  # punctuation kept
    inserted = augment.random_insertion(words, 3, random.Random(0), SYNONYMS)
    assert len(inserted) == len(words) + 3
    swapped = augment.random_swap(words, 2, random.Random(0))
    assert sorted(swapped) == sorted(words) and swapped != words
    deleted = augment.random_deletion(words, 0.3, random.Random(0))
    assert 0 < len(deleted) < len(words) and all(w in words for w in deleted)


def test_stop_words_are_never_replaced():
    table = {"the": ("thee",), "for": ("fore",)}
    assert augment.eda("the offer is for you", random.Random(0), 0.5, "synonym", table) == (
        "the offer is for you"
    )


@pytest.mark.parametrize("operator", augment.OPERATORS)
def test_edge_cases_empty_text_and_one_word(operator):
    assert augment.eda("", random.Random(0), 0.1, operator, SYNONYMS) == ""
    assert augment.eda("   ", random.Random(0), 0.1, operator, SYNONYMS) == "   "
    one = augment.eda("money", random.Random(0), 0.1, operator, SYNONYMS)
    assert one.split()[0] in {"money", "cash"} and len(one.split()) <= 2
    assert augment.eda("xyzzy", random.Random(0), 0.9, operator, SYNONYMS) == "xyzzy"


def test_augment_texts_keeps_labels_and_order_independence():
    texts, labels = [MAIL, "meeting at noon about the budget", ""], [1, 0, 0]
    out, out_labels, ops = augment.augment_texts(texts, labels, copies=4, seed=1, synonyms=SYNONYMS)
    assert len(out) == len(out_labels) == len(ops) == 3 * 5
    assert out[:3] == texts and ops[:3] == ["original"] * 3
    assert out_labels == [1, 0, 0] + [1] * 4 + [0] * 4 + [0] * 4
    assert ops[3:7] == list(augment.OPERATORS)
    again, _, _ = augment.augment_texts(texts[:2], labels[:2], copies=4, seed=1, synonyms=SYNONYMS)
    assert again[2:10] == out[3:11]  # copies of a text do not depend on the texts after it
    other, _, _ = augment.augment_texts(texts, labels, copies=4, seed=2, synonyms=SYNONYMS)
    assert other != out


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(MfkitError, match="labels"):
        augment.augment_texts(["a"], [0, 1], copies=1)
    with pytest.raises(MfkitError, match="copies"):
        augment.augment_texts(["a"], [0], copies=-1)
    with pytest.raises(MfkitError, match="alpha"):
        augment.eda("a b", random.Random(0), alpha=1.5)
    with pytest.raises(MfkitError, match="operator"):
        augment.eda("a b", random.Random(0), operator="shuffle")
    with pytest.raises(MfkitError, match="rate"):
        augment.perturb("a b", random.Random(0), rate=2)
    with pytest.raises(MfkitError, match="threshold"):
        augment.select_confident(np.array([[0.5, 0.5]]), threshold=0)


def test_perturbations_are_seeded_and_keep_the_text_readable():
    texts = [MAIL, "Please review the attached budget before Friday's meeting"]
    one, two = augment.perturb_texts(texts, seed=4, rate=0.3), augment.perturb_texts(texts, seed=4, rate=0.3)
    assert one == two and one != texts
    assert augment.perturb_texts(texts, seed=4, rate=0.0) == [" ".join(t.split()) for t in texts]
    assert augment.perturb_texts([""], seed=0, rate=1.0) == [""]
    rng = random.Random(0)
    assert augment.swap_chars("ab", rng) == "ab"
    swapped = augment.swap_chars("money", rng)
    assert (
        sorted(swapped) == sorted("money") and swapped[0] == "m" and swapped[-1] == "y" and swapped != "money"
    )
    typo = augment.typo("Cash", random.Random(1))
    assert (
        len(typo) == 4 and sum(a != b for a, b in zip(typo, "Cash", strict=True)) == 1 and typo[0].isupper()
    )
    assert augment.typo("2002", rng) == "2002"
    inserted = augment.perturb("a b c", random.Random(0), rate=1.0, kinds=["insert"], noise_words=["zz"])
    assert inserted == "a zz b zz c zz"


def test_select_confident_picks_sure_rows_and_their_classes():
    probs = np.array([[0.95, 0.05], [0.4, 0.6], [0.02, 0.98], [0.9, 0.1]])
    rows, labels = augment.select_confident(probs, 0.9)
    assert rows.tolist() == [0, 2, 3] and labels.tolist() == [0, 1, 0]
    rows, _ = augment.select_confident(probs, 0.99)
    assert rows.tolist() == []


def test_class_balanced_selection_follows_the_shares_and_keeps_the_surest():
    # 6 confident ham rows, 2 confident spam rows, one unsure row
    probs = np.array(
        [[0.99, 0.01], [0.97, 0.03], [0.95, 0.05], [0.93, 0.07], [0.92, 0.08], [0.91, 0.09]]
        + [[0.05, 0.95], [0.02, 0.98], [0.5, 0.5]]
    )
    rows, labels = augment.select_confident(probs, 0.9, class_shares=[0.5, 0.5])
    assert rows.tolist() == [0, 1, 6, 7] and labels.tolist() == [0, 0, 1, 1]  # 2 spam allow 2 ham, the surest
    rows, labels = augment.select_confident(probs, 0.9, class_shares=[0.75, 0.25])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 2
    rows, _ = augment.select_confident(probs[:6], 0.9, class_shares=[0.5, 0.5])  # no spam: nothing is taken
    assert rows.tolist() == []
    with pytest.raises(MfkitError, match="class_shares"):
        augment.select_confident(probs, 0.9, class_shares=[0.5, 0.6])


# ---- FGM ----------------------------------------------------------------------------------------------------


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def rows(n: int = 32) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        label = i % 2
        ids = torch.randint(5, 15, (8,), generator=gen) + 10 * label  # the classes use different tokens
        out.append({"input_ids": [2, *ids.tolist(), 3], "attention_mask": [1] * 10, "labels": label})
    return out


def test_fgm_perturbation_has_norm_epsilon_per_example():
    grad = torch.randn(3, 5, 4)
    r = augment.fgm_perturbation(grad, 0.5)
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((3,), 0.5))
    assert torch.allclose(
        r / r.flatten(1).norm(dim=1).view(-1, 1, 1), grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1)
    )
    assert torch.equal(augment.fgm_perturbation(torch.zeros(2, 3, 4), 1.0), torch.zeros(2, 3, 4))


def test_fgm_loss_adds_a_larger_adversarial_loss_and_restores_the_embeddings():
    model = tiny_bert().eval()
    batch = pad_collate(0)(rows(8))
    weights = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        before = model(**batch).logits
    clean = model(**batch).loss
    total = augment.fgm_loss(1.0)(model, batch)
    adversarial = total - clean
    assert adversarial.item() > clean.item()  # a step up the loss surface raises the loss
    zero_weight = augment.fgm_loss(1.0, adversarial_weight=0.0)(model, batch)
    assert torch.allclose(zero_weight, clean)
    total.backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert torch.equal(model.get_input_embeddings().weight.detach(), weights)  # nothing was left perturbed
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_fgm_direction_is_taken_of_a_scaled_loss_and_equals_the_unscaled_one_in_fp32(monkeypatch):
    """The clean loss is scaled before differentiating (fp16 keeps dL/de's small entries); r is unchanged."""
    model = tiny_bert().eval()
    batch = pad_collate(0)(rows(8))
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    embeds = model.get_input_embeddings()(batch["input_ids"])
    (unscaled,) = torch.autograd.grad(model(inputs_embeds=embeds, **inputs).loss, embeds)
    seen = []
    plain = augment.fgm_perturbation
    monkeypatch.setattr(augment, "fgm_perturbation", lambda g, eps: seen.append(g) or plain(g, eps))
    augment.fgm_loss(1.0)(model, batch)
    (grad,) = seen
    torch.testing.assert_close(grad, unscaled * augment.FGM_GRAD_SCALE, rtol=1e-6, atol=0)
    torch.testing.assert_close(plain(grad, 1.0), plain(unscaled, 1.0), rtol=1e-6, atol=1e-9)


def test_fgm_loss_trains_through_fit():
    model = tiny_bert()
    loader = make_loader(rows(), 8, pad_collate(0), seed=0)
    config = TrainConfig(max_steps=12, lr=3e-3, log_every=4, progress=False, warmup=0)
    history = fit(model, loader, config, loss_fn=augment.fgm_loss(0.5))
    assert history.train[-1]["loss"] < history.train[0]["loss"]
    with pytest.raises(MfkitError, match="input_ids"):
        augment.fgm_loss(1.0)(model, {"labels": torch.tensor([0])})


def test_text_loader_and_predict_texts(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "cheap", "money", "meeting", "noon"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    texts, labels = ["cheap money cheap money", "meeting noon", "noon"], [1, 0, 0]
    dataset = augment.encode_texts(texts, labels, tokenizer, max_length=3)
    assert dataset["input_ids"][0] == [2, 3, 2] and dataset["labels"] == labels
    predictions = augment.predict_texts(tiny_bert(), tokenizer, texts, labels, max_length=3, batch_size=2)
    assert predictions.probs.shape == (3, 2) and predictions.labels.tolist() == labels
    with pytest.raises(MfkitError, match="labels"):
        augment.encode_texts(texts, [0], tokenizer, 3)
