"""Unit tests of mfkit.transfer: label alignment, the collator, span scoring vs seqeval, the two-head tagger."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import BertConfig, BertModel

import mfkit
from mfkit import MfkitError
from mfkit.transfer import (
    IGNORE,
    POS_TAGS,
    SPAN_TAGS,
    MultiTaskTagger,
    align_labels,
    bio_spans,
    check_columns,
    coarse_tag,
    genre_subset,
    predict_tags,
    scores_by_group,
    span_scores,
    tagging_loader,
    tagging_scores,
    tokenize_and_align,
)

SENTENCES = {
    "tokens": [["Mr.", "Hawksley", "visited", "Czechoslovakia", "."], ["It", "rained", "."]],
    "pos": [["np", "np", "vbd", "np-tl", "."], ["pps", "vbd", "."]],
    "spans": [[1, 2, 0, 1, 0], [0, 0, 0]],
    "genre": ["news", "fiction"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return mfkit.load_tokenizer("minilm")


def test_align_labels_first_piece_only():
    # [CLS] w0 w1 w1 w1 w2 [SEP] [PAD]
    word_ids = [None, 0, 1, 1, 1, 2, None, None]
    assert align_labels(word_ids, [5, 7, 9]) == [IGNORE, 5, 7, IGNORE, IGNORE, 9, IGNORE, IGNORE]
    with pytest.raises(MfkitError, match="one label per word"):
        align_labels([None, 0, 1, None], [5])


def test_tokenize_and_align_on_words_that_split(tokenizer):
    data = tokenize_and_align(Dataset.from_dict(SENTENCES), tokenizer, max_length=32)
    ids, labels = data[0]["input_ids"], data[0]["labels_pos"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert labels[0] == IGNORE and labels[-1] == IGNORE  # specials are ignored
    # "Mr." -> mr . and "Hawksley" -> hawks ##ley: each word labelled on its first piece only
    assert pieces == ["[CLS]", "mr", ".", "hawks", "##ley", "visited", "czechoslovakia", ".", "[SEP]"]
    pos = [POS_TAGS.index(t) for t in ("PROPN", "PROPN", "VERB", "PROPN", "PUNCT")]
    assert labels == [IGNORE, pos[0], IGNORE, pos[1], IGNORE, pos[2], pos[3], pos[4], IGNORE]
    assert data[0]["labels_spans"] == [IGNORE, 1, IGNORE, 2, IGNORE, 0, 1, 0, IGNORE]
    assert data[0]["words"] == 5
    # a cut sentence keeps the labels of the words that survive
    cut = tokenize_and_align(Dataset.from_dict(SENTENCES), tokenizer, max_length=4)
    assert len(cut[0]["input_ids"]) == 4 and cut[0]["words"] < 5


def test_collator_pads_every_task_with_ignore(tokenizer):
    data = tokenize_and_align(Dataset.from_dict(SENTENCES), tokenizer, max_length=32)
    batch = next(iter(tagging_loader(data, tokenizer, ("pos", "spans"), batch_size=2, shuffle=False)))
    width = batch["input_ids"].shape[1]
    assert batch["labels"].shape == batch["labels_spans"].shape == (2, width)
    short = len(data[1]["input_ids"])
    assert (batch["labels"][1, short:] == IGNORE).all() and (batch["labels_spans"][1, short:] == IGNORE).all()
    assert (batch["attention_mask"][1, short:] == 0).all()
    with pytest.raises(MfkitError, match="Unknown task"):
        tagging_loader(data, tokenizer, ("ner",), batch_size=2, shuffle=False)


def test_coarse_tags():
    cases = {"np-tl": "PROPN", "nns": "NOUN", "vbd": "VERB", "bez": "AUX", "pps+bez": "PRON", "at": "DET"}
    cases |= {",-hl": "PUNCT", "--": "PUNCT", "fw-nn": "X", "cd": "NUM", "in": "ADP", "*": "ADV", "to": "PRT"}
    cases |= {"nr": "NOUN", "nrs": "NOUN", "nr-tl": "NOUN", "nps": "PROPN"}  # adverbial nouns are not names
    assert {raw: coarse_tag(raw) for raw in cases} == cases


def test_span_scores_agree_with_seqeval():
    true = [["B-NAME", "I-NAME", "O", "B-NAME"], ["O", "B-NAME", "I-NAME", "I-NAME"], ["B-NAME", "O"]]
    pred = [["B-NAME", "I-NAME", "O", "O"], ["O", "B-NAME", "I-NAME", "O"], ["I-NAME", "B-NAME"]]
    assert bio_spans(true[0]) == {("NAME", 0, 1), ("NAME", 3, 3)}
    assert bio_spans(["O", "I-NAME", "I-NAME"]) == {("NAME", 1, 2)}  # an I- after O starts a span (conlleval)
    ours = span_scores(true, pred)
    # by hand: 4 true spans, 4 predicted, 2 exact matches (the first span, and "I-NAME" at 0 of the last sentence)
    assert ours == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert ours["precision"] == pytest.approx(precision_score(true, pred))
    assert ours["recall"] == pytest.approx(recall_score(true, pred))
    assert ours["f1"] == pytest.approx(f1_score(true, pred))
    scores = tagging_scores({"spans": (true, pred), "pos": ([["NOUN", "VERB"]], [["NOUN", "NOUN"]])})
    assert scores["entity_f1"] == pytest.approx(ours["f1"]) and scores["pos_accuracy"] == 0.5
    by_genre = scores_by_group({"spans": (true, pred)}, ["news", "news", "humor"])
    assert by_genre["news"]["entity_f1"] == pytest.approx(f1_score(true[:2], pred[:2]))
    assert by_genre["humor"]["entity_f1"] == pytest.approx(f1_score(true[2:], pred[2:]))
    with pytest.raises(MfkitError, match="one group name per sentence"):
        scores_by_group({"spans": (true, pred)}, ["news"])


def test_multitask_tagger_shapes_and_loss(tokenizer):
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        add_pooling_layer=False,
    )
    model = MultiTaskTagger(encoder, {"pos": len(POS_TAGS), "spans": len(SPAN_TAGS)})
    data = tokenize_and_align(Dataset.from_dict(SENTENCES), tokenizer, max_length=32)
    batch = next(iter(tagging_loader(data, tokenizer, ("pos", "spans"), batch_size=2, shuffle=False)))
    out = model(**batch)
    width = batch["input_ids"].shape[1]
    assert out.logits["pos"].shape == (2, width, len(POS_TAGS))
    assert out.logits["spans"].shape == (2, width, len(SPAN_TAGS))
    pos_only = model.eval()(**{k: v for k, v in batch.items() if k != "labels_spans"}).loss
    both = model(**batch).loss
    spans_loss = torch.nn.functional.cross_entropy(
        model(**batch).logits["spans"].flatten(0, 1), batch["labels_spans"].flatten(), ignore_index=IGNORE
    )
    torch.testing.assert_close(both, pos_only + spans_loss)  # the loss is the sum of the tasks' losses
    both.backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    assert model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).loss is None
    predictions = predict_tags(model, [batch], ("pos", "spans"))
    assert [len(s) for s in predictions["spans"][0]] == [5, 3] == [len(s) for s in predictions["pos"][1]]


def test_every_weight_of_the_tagger_gets_a_gradient_even_from_an_encoder_with_a_pooler(tokenizer):
    """DDP (find_unused_parameters=False) stops at the second step on a weight the loss never reaches."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = MultiTaskTagger(
        BertModel(config), {"pos": len(POS_TAGS), "spans": len(SPAN_TAGS)}
    )  # as AutoModel
    data = tokenize_and_align(Dataset.from_dict(SENTENCES), tokenizer, max_length=32)
    batch = next(iter(tagging_loader(data, tokenizer, ("pos", "spans"), batch_size=2, shuffle=False)))
    model(**batch).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_bad_input_names_the_problem():
    no_spans = DatasetDict({"train": Dataset.from_dict({k: v for k, v in SENTENCES.items() if k != "spans"})})
    with pytest.raises(MfkitError, match=r"no column\(s\) \['spans'\]"):
        check_columns(no_spans)
    with pytest.raises(MfkitError, match="Unknown genre"):
        genre_subset(Dataset.from_dict(SENTENCES), ["poetry"])
    assert len(genre_subset(Dataset.from_dict(SENTENCES), ["news"])) == 1


def test_compare_taggers_resamples_sentences_and_scores_like_tagging_scores():
    from mfkit.transfer import compare_taggers, tagging_scores

    true = [["B-NAME", "I-NAME", "O", "B-NAME"], ["O", "B-NAME", "I-NAME", "I-NAME"], ["B-NAME", "O"]] * 5
    good = [["B-NAME", "I-NAME", "O", "B-NAME"], ["O", "B-NAME", "I-NAME", "I-NAME"], ["B-NAME", "O"]] * 5
    poor = [["B-NAME", "I-NAME", "O", "O"], ["O", "B-NAME", "I-NAME", "O"], ["I-NAME", "B-NAME"]] * 5
    pos_true = [["NOUN", "VERB"], ["DET", "NOUN", "PUNCT"]] * 6
    pos_pred = [["NOUN", "NOUN"], ["DET", "NOUN", "PUNCT"]] * 6
    a = {"spans": (true, good), "pos": (pos_true, pos_true)}
    b = {"spans": (true, poor), "pos": (pos_true, pos_pred)}
    spans = compare_taggers(a, b, "spans")
    assert spans["a"] == pytest.approx(tagging_scores(a)["entity_f1"])
    assert spans["b"] == pytest.approx(tagging_scores(b)["entity_f1"])
    assert spans["verdict"] == "above" and spans["low"] > 0
    pos = compare_taggers(b, a, "pos")
    assert pos["b"] == 1.0 and pos["a"] == pytest.approx(tagging_scores(b)["pos_accuracy"])
    assert compare_taggers(a, a, "spans")["verdict"] == "no clear difference"
    with pytest.raises(MfkitError, match="different sentences"):
        compare_taggers(a, {"spans": (true[:-1], good[:-1])}, "spans")
