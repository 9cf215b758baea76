"""Unit tests of mfkit.classify: tokenization, limits, loaders, metrics, the TF-IDF baseline (a few seconds)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from torch import nn

from mfkit import MfkitError
from mfkit.classify import (
    classification_loaders,
    confusion,
    evaluate_classifier,
    label_maps,
    limit_rows,
    predict,
    stratified_take,
    texts_seen,
    tfidf_baseline,
    tokenize_for_classification,
)

SPAMMY = ["buy cheap pills now", "free money click here", "cheap loans free offer now", "win free money now"]
HAMMY = [
    "see you at the meeting",
    "the report is attached",
    "lunch at noon tomorrow",
    "notes from the meeting",
]
FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=["ham", "spam"])})


def make_split(n_ham: int, n_spam: int, offset: int = 0) -> Dataset:
    """Ham first, then spam (the worst order for a naive head-of-file limit)."""
    texts = [f"{HAMMY[(i + offset) % 4]} {i}" for i in range(n_ham)] + [
        f"{SPAMMY[(i + offset) % 4]} {i}" for i in range(n_spam)
    ]
    return Dataset.from_dict({"text": texts, "label": [0] * n_ham + [1] * n_spam}, features=FEATURES)


@pytest.fixture
def dsdict() -> DatasetDict:
    return DatasetDict(train=make_split(30, 10), validation=make_split(9, 3, 1), test=make_split(9, 3, 2))


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the test vocabulary, with BERT's [CLS] ... [SEP] template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in SPAMMY + HAMMY for w in t.split()} | {str(i) for i in range(40)})
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def tiny_bert(vocab_size: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


# ---- tokenization ----------------------------------------------------------------------------------------------


def test_tokenize_truncates_without_padding_and_keeps_labels(dsdict, tokenizer):
    tokenized = tokenize_for_classification(dsdict, tokenizer, max_length=5)
    assert list(tokenized) == ["train", "validation", "test"]
    for split in tokenized:
        rows = tokenized[split]
        assert set(rows.column_names) <= {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert rows["labels"] == dsdict[split]["label"]  # same labels, same order
        lengths = [len(ids) for ids in rows["input_ids"]]
        assert max(lengths) == 5  # truncated (the texts are longer)
        assert all(len(m) == n for m, n in zip(rows["attention_mask"], lengths, strict=True))
        assert all(
            ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
            for ids in rows["input_ids"]
        )
    # Without truncation pressure the rows keep their own lengths: no padding happens here.
    loose = tokenize_for_classification(dsdict, tokenizer, max_length=64)["train"]
    expected = [len(t.split()) + 2 for t in dsdict["train"]["text"]]
    assert [len(ids) for ids in loose["input_ids"]] == expected
    assert len(set(expected)) > 1


def test_texts_seen_are_the_truncated_mails_with_their_labels(dsdict, tokenizer):
    tokenized = tokenize_for_classification(dsdict, tokenizer, max_length=4)  # [CLS] + 2 words + [SEP]
    seen = texts_seen(tokenized, tokenizer)
    for split in dsdict:
        assert seen[split]["label"] == dsdict[split]["label"]
        assert seen[split]["text"] == [" ".join(t.split()[:2]) for t in dsdict[split]["text"]]
    # A word outside the vocabulary stays visible as the unknown token: the model reads it too.
    odd = DatasetDict(test=Dataset.from_dict({"text": ["zebra money now"], "label": [1]}, features=FEATURES))
    seen = texts_seen(tokenize_for_classification(odd, tokenizer, max_length=4), tokenizer)
    assert seen["test"]["text"] == [f"{tokenizer.unk_token} money"]


def test_limits_are_stratified_and_deterministic(dsdict, tokenizer):
    limited = tokenize_for_classification(dsdict, tokenizer, 8, limits={"train": 8, "validation": 4})
    assert len(limited["train"]) == 8 and len(limited["validation"]) == 4 and len(limited["test"]) == 12
    assert sorted(limited["train"]["labels"]) == [0] * 6 + [1] * 2  # 30:10 kept as 6:2
    assert set(limited["validation"]["labels"]) == {0, 1}
    again = tokenize_for_classification(dsdict, tokenizer, 8, limits={"train": 8, "validation": 4})
    assert again["train"]["input_ids"] == limited["train"]["input_ids"]
    # An int applies to every split; even 2 rows keep both classes.
    tiny = limit_rows(dsdict, 2)
    assert all(sorted(tiny[s]["label"]) == [0, 1] for s in tiny)


def test_stratified_take_keeps_a_rare_class():
    labels = [0] * 98 + [1] * 2
    taken = stratified_take(labels, 10)
    assert len(taken) == 10 and taken == sorted(taken)
    assert {labels[i] for i in taken} == {0, 1}
    assert stratified_take(labels, 500) == list(range(100))


def test_bad_limits_raise(dsdict):
    with pytest.raises(MfkitError, match="unknown split"):
        limit_rows(dsdict, {"dev": 3})
    with pytest.raises(MfkitError, match="row limit"):
        limit_rows(dsdict, {"train": 0})


def test_missing_label_column_raises(dsdict, tokenizer):
    with pytest.raises(MfkitError, match="'category' is not in the 'train' split") as info:
        tokenize_for_classification(dsdict, tokenizer, 16, label_column="category")
    assert "label_column=" in str(info.value)
    with pytest.raises(MfkitError, match="text column 'body'"):
        tokenize_for_classification(dsdict, tokenizer, 16, text_column="body")
    with pytest.raises(MfkitError, match="label column"):
        tfidf_baseline(dsdict.remove_columns("label"))


def test_string_labels_raise(tokenizer):
    table = Dataset.from_dict({"text": ["a b", "c d"], "label": ["ham", "spam"]})
    with pytest.raises(MfkitError, match="not class ids"):
        tokenize_for_classification(DatasetDict(train=table, validation=table, test=table), tokenizer, 8)


# ---- loaders and training ----------------------------------------------------------------------------------------


def test_loaders_pad_dynamically(dsdict, tokenizer):
    tokenized = tokenize_for_classification(dsdict, tokenizer, max_length=32)
    train, validation, test = classification_loaders(tokenized, tokenizer, batch_size=4, seed=0)
    batch = next(iter(validation))
    assert batch["input_ids"].shape[0] == 8  # evaluation batches default to twice the training batch
    assert batch["input_ids"].shape[1] == max(len(r) for r in tokenized["validation"][:8]["input_ids"])
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8,)
    first = [
        next(iter(classification_loaders(tokenized, tokenizer, 4, seed=1).train))["labels"] for _ in range(2)
    ]
    assert torch.equal(first[0], first[1])  # the same seed gives the same order
    assert len(test.dataset) == 12 and len(train.dataset) == 40


def test_loaders_need_a_pad_token(dsdict, tokenizer):
    tokenized = tokenize_for_classification(dsdict, tokenizer, max_length=8)
    with pytest.raises(MfkitError, match="padding token"):
        classification_loaders(tokenized, SimpleNamespace(pad_token_id=None), batch_size=4)


def test_fit_early_stops_on_eval_f1(dsdict, tokenizer):
    from mfkit.training import TrainConfig, fit

    tokenized = tokenize_for_classification(dsdict, tokenizer, max_length=16)
    loaders = classification_loaders(tokenized, tokenizer, batch_size=8, seed=0)
    model = tiny_bert(len(tokenizer))
    config = TrainConfig(
        max_steps=6, lr=1e-3, eval_every=2, monitor="eval_f1", mode="max", patience=5, progress=False
    )
    history = fit(model, loaders.train, config, eval_loader=loaders.validation, eval_fn=evaluate_classifier)
    assert [e["step"] for e in history.eval] == [2, 4, 6]
    assert {"eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1", "eval_macro_f1"} <= set(
        history.eval[0]
    )
    assert history.best_metric == max(e["eval_f1"] for e in history.eval)


# ---- metrics -------------------------------------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """Returns the logits [0, log 3] (p(spam) = 3/4) or [log 3, 0] (p(ham) = 3/4), picked by input_ids[:, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]]), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids[:, 1]])


def test_evaluate_classifier_matches_hand_computed_metrics():
    labels = [1, 1, 1, 0, 0, 0, 0]
    preds = [1, 1, 0, 1, 0, 0, 0]  # TP 2, FN 1, FP 1, TN 3
    rows = Dataset.from_dict({"input_ids": [[9, p] for p in preds], "labels": labels})
    from mfkit.loaders import make_loader, pad_collate

    loader = make_loader(rows, batch_size=3, collate_fn=pad_collate(0), shuffle=False)
    metrics = evaluate_classifier(FixedLogits(), loader)
    expected_loss = (5 * -math.log(3 / 4) + 2 * -math.log(1 / 4)) / 7
    assert metrics == pytest.approx(
        {
            "eval_loss": expected_loss,
            "eval_accuracy": 5 / 7,
            "eval_precision": 2 / 3,
            "eval_recall": 2 / 3,
            "eval_f1": 2 / 3,
            "eval_macro_f1": (2 / 3 + 3 / 4) / 2,  # ham: precision 3/4, recall 3/4
        }
    )
    assert set(evaluate_classifier(FixedLogits(), loader, prefix="test_")) == {
        k.replace("eval_", "test_") for k in metrics
    }


def test_confusion_rows_are_true_classes():
    matrix = confusion([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0])
    assert matrix.tolist() == [[3, 1], [1, 2]]
    assert confusion([0, 0], [0, 0], num_labels=2).tolist() == [[2, 0], [0, 0]]
    with pytest.raises(MfkitError):
        confusion([0, 1], [0])


def test_label_maps():
    assert label_maps(["ham", "spam"]) == ({0: "ham", 1: "spam"}, {"ham": 0, "spam": 1})


# ---- baseline --------------------------------------------------------------------------------------------------------


def test_tfidf_baseline_on_tiny_data(dsdict):
    scores = tfidf_baseline(dsdict, min_df=1)
    assert {"accuracy", "precision", "recall", "f1", "macro_f1", "c", "seconds"} <= set(scores)
    assert scores["f1"] == 1.0  # the spam and ham vocabularies do not overlap
    assert scores["c"] in (1.0, 10.0, 100.0)
    one_class = DatasetDict(train=make_split(5, 0), validation=make_split(2, 1), test=make_split(2, 1))
    with pytest.raises(MfkitError, match="single class"):
        tfidf_baseline(one_class, min_df=1)
    assert np.isfinite(scores["seconds"])


class TwoRanks:
    """Stands in for an Accelerator of 2 processes whose other rank scored the same rows: gathering doubles them."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls = 0

    def gather_for_metrics(self, rows: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([rows, rows])


def test_evaluation_inside_fit_gathers_every_process_rows():
    """fit runs eval_fn inside `gathering_with(accelerator)`: predictions and scores of a loader accelerate prepared
    (each process reads its shard) cover every process's shard; a plain loader, read whole by every process, is
    left as it is."""
    from accelerate.data_loader import DataLoaderShard

    from mfkit.loaders import make_loader, pad_collate
    from mfkit.metrics import gathering_with

    rows = Dataset.from_dict({"input_ids": [[9, p] for p in (1, 0, 0)], "labels": [1, 0, 1]})
    loader = DataLoaderShard(
        rows, batch_size=2, collate_fn=pad_collate(0)
    )  # as `accelerator.prepare` returns
    plain = make_loader(rows, batch_size=2, collate_fn=pad_collate(0), shuffle=False)
    ranks = TwoRanks()
    with gathering_with(ranks):
        gathered = predict(FixedLogits(), loader)
        metrics = evaluate_classifier(FixedLogits(), loader)
        assert ranks.calls == 2 * 2 * 2  # logits and labels, 2 batches, in both calls
        assert predict(FixedLogits(), plain).labels.tolist() == [1, 0, 1] and ranks.calls == 8
    assert gathered.labels.tolist() == [1, 0, 1, 0, 1, 1]
    assert metrics == pytest.approx(evaluate_classifier(FixedLogits(), loader))  # duplicated rows: same means
    assert len(predict(FixedLogits(), loader).labels) == 3  # outside the block: this process's rows only
