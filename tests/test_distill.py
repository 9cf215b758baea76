"""mfkit.distill: the KD loss and its identities, T^2 scaling of gradients, the layer-selection initialiser,
cached teacher logits in fit, and a saved student that reloads with plain transformers."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from mfkit import classify, distill
from mfkit.errors import MfkitError
from mfkit.loaders import make_loader, pad_collate
from mfkit.training import TrainConfig, fit


def tiny_bert(layers: int = 4, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def rows(n: int = 24) -> Dataset:
    return Dataset.from_list(
        [
            {
                "input_ids": [2 + (i * 7 + j) % 38 for j in range(3 + i % 6)],
                "attention_mask": [1] * (3 + i % 6),
                "labels": i % 2,
            }
            for i in range(n)
        ]
    )


def test_kd_loss_is_cross_entropy_when_alpha_is_zero():
    student, teacher = torch.randn(8, 3), torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    expected = F.cross_entropy(student, labels)
    for t in (1.0, 4.0):
        assert torch.equal(distill.kd_loss(student, teacher, labels, temperature=t, alpha=0.0), expected)


def test_kd_loss_is_cross_entropy_on_one_hot_teacher_at_t1_alpha1():
    # a teacher whose soft targets are the hard labels: KL(one-hot || p) = -log p_y, the cross-entropy
    student = torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    one_hot_teacher = 100.0 * F.one_hot(labels, 3).float()
    loss = distill.kd_loss(student, one_hot_teacher, labels, temperature=1.0, alpha=1.0)
    assert loss.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)


def test_kd_loss_mixes_the_two_terms_and_is_zero_soft_when_student_matches():
    student = torch.randn(6, 2)
    labels = torch.randint(0, 2, (6,))
    hard = F.cross_entropy(student, labels)
    # the student equal to the teacher: the soft term vanishes, only the hard term's share is left
    assert distill.kd_loss(student, student.clone(), labels, 3.0, 0.25).item() == pytest.approx(
        0.75 * hard.item(), rel=1e-6
    )


def test_t_squared_keeps_soft_gradients_the_same_size_across_temperatures():
    # for large T, d(KL_T)/dz_s ~ (z_s - z_t) / (C T^2) (zero-mean logits, Hinton et al. 2015): T^2 undoes it
    torch.manual_seed(0)
    teacher = torch.randn(4, 3)
    teacher -= teacher.mean(-1, keepdim=True)
    base = torch.randn(4, 3)
    base -= base.mean(-1, keepdim=True)
    labels = torch.zeros(4, dtype=torch.long)
    grads = {}
    for t in (20.0, 40.0, 80.0):
        student = base.clone().requires_grad_(True)
        distill.kd_loss(student, teacher, labels, temperature=t, alpha=1.0).backward()
        grads[t] = student.grad
    limit = (base - teacher) / 3 / 4  # / C classes, / batch size (batchmean)
    for t, grad in grads.items():
        assert (grad - limit).norm() / limit.norm() < 0.05, t
    # without the factor the gradient would shrink 4x per doubling of T
    assert grads[40.0].norm() / grads[20.0].norm() == pytest.approx(1.0, abs=0.03)


def test_kd_loss_refuses_bad_settings():
    z = torch.zeros(2, 2)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(MfkitError, match="alpha=1.5"):
        distill.kd_loss(z, z, y, alpha=1.5)
    with pytest.raises(MfkitError, match="temperature=0"):
        distill.kd_loss(z, z, y, temperature=0)
    with pytest.raises(MfkitError, match="differ"):
        distill.kd_loss(z, torch.zeros(2, 3), y)


def test_layer_selected_student_copies_the_mapped_layers_and_the_rest():
    teacher = tiny_bert(layers=6)
    student = distill.layer_selected_student(teacher, distill.every_other_layer(6))
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    for k, source in enumerate([0, 2, 4]):
        mine, theirs = (
            student.bert.encoder.layer[k].state_dict(),
            teacher.bert.encoder.layer[source].state_dict(),
        )
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    for part in ("bert.embeddings", "bert.pooler", "classifier"):
        mine, theirs = student.get_submodule(part).state_dict(), teacher.get_submodule(part).state_dict()
        assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    custom = distill.layer_selected_student(teacher, [5, 1])
    assert torch.equal(
        custom.bert.encoder.layer[0].output.dense.weight, teacher.bert.encoder.layer[5].output.dense.weight
    )
    # a copy, not a view: training the student leaves the teacher alone
    assert student.bert.encoder.layer[0].output.dense.weight.data_ptr() != (
        teacher.bert.encoder.layer[0].output.dense.weight.data_ptr()
    )


def test_layer_selected_student_refuses_a_bad_map():
    with pytest.raises(MfkitError, match=r"\[7\] are not"):
        distill.layer_selected_student(tiny_bert(layers=4), [0, 7])
    with pytest.raises(MfkitError, match="empty"):
        distill.layer_selected_student(tiny_bert(layers=4), [])


def test_scratch_student_has_the_shape_but_not_the_weights():
    student = distill.layer_selected_student(tiny_bert(layers=4), [0, 2])
    scratch = distill.scratch_student(student)
    assert distill.parameter_count(scratch) == distill.parameter_count(student)
    assert not torch.equal(scratch.classifier.weight, student.classifier.weight)


def test_cached_teacher_logits_train_a_student_with_fit():
    teacher = tiny_bert(layers=4)
    data = distill.with_teacher_logits(rows(), teacher, pad_id=0, batch_size=5)
    loader = make_loader(rows(), 8, pad_collate(0), shuffle=False)
    expected = torch.cat([teacher(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader])
    assert torch.allclose(torch.tensor(data["teacher_logits"]), expected, atol=1e-5)
    student = distill.layer_selected_student(teacher, [0, 2]).eval()  # no dropout while comparing losses
    loss_fn = distill.DistillationLoss(temperature=2.0, alpha=0.5)
    train = make_loader(data, 8, distill.teacher_collate(0), seed=0)
    batch = next(iter(train))
    assert batch["teacher_logits"].shape == (8, 2) and batch["teacher_logits"].dtype == torch.float32
    # the cached logits give the same loss as running the teacher on the batch
    live = distill.DistillationLoss(2.0, 0.5, teacher=teacher)
    without = {k: v for k, v in batch.items() if k != "teacher_logits"}
    assert loss_fn(student, batch).item() == pytest.approx(live(student, without).item(), rel=1e-5)
    before = loss_fn(student, batch).item()
    history = fit(
        student, train, TrainConfig(max_steps=12, lr=3e-3, warmup=0, progress=False), loss_fn=loss_fn
    )
    assert history.steps == 12 and loss_fn(student.eval(), batch).item() < before
    with pytest.raises(MfkitError, match="no teacher model"):
        loss_fn(student, without)


def test_saved_student_reloads_with_plain_transformers_and_predicts_the_same(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(35)]]))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    student = distill.layer_selected_student(tiny_bert(layers=4), [1, 3])
    folder = classify.save_classifier(
        student, tokenizer, tmp_path / "16-student", card={"scores": {"test_f1": 1}}
    )
    again = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert again.config.num_hidden_layers == 2
    loader = make_loader(rows(), 8, pad_collate(0), shuffle=False)
    assert torch.equal(
        torch.from_numpy(classify.predict(student, loader).logits),
        torch.from_numpy(classify.predict(again, loader).logits),
    )
    assert (folder / classify.CARD_NAME).exists()
