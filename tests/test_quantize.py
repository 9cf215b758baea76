"""Tests of mfkit.quantize: the affine int8 math, dynamic int8 on a tiny BERT, and the save/reload round trip."""

from __future__ import annotations

import nbformat
import pytest
import torch
from torch import nn

from mfkit import quantize
from mfkit.errors import MfkitError
from mfkit.paths import notebooks_dir
from mfkit.timing import on_device

NOTEBOOKS = notebooks_dir()


def test_int_range() -> None:
    assert quantize.int_range(8, symmetric=False) == (-128, 127)
    assert quantize.int_range(8, symmetric=True) == (-127, 127)
    assert quantize.int_range(4, symmetric=False) == (-8, 7)
    with pytest.raises(MfkitError, match="bits"):
        quantize.int_range(1, symmetric=False)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_at_most_half_a_step(symmetric: bool, bits: int) -> None:
    x = torch.randn(64, 48) * 3 + 0.5
    scale, zero = quantize.affine_qparams(x, bits=bits, symmetric=symmetric)
    q = quantize.quantize_affine(x, scale, zero, bits=bits, symmetric=symmetric)
    qmin, qmax = quantize.int_range(bits, symmetric)
    assert q.min() >= qmin and q.max() <= qmax
    error = (quantize.dequantize_affine(q, scale, zero) - x).abs()
    assert error.max() <= scale.item() / 2 + 1e-6


def test_affine_zero_is_exact_and_range_used() -> None:
    x = torch.tensor([0.0, 0.5, 1.0, 2.0])  # all non-negative: the affine range is [0, 2]
    scale, zero = quantize.affine_qparams(x)
    assert scale.item() == pytest.approx(2.0 / 255)
    assert zero.item() == -128
    assert quantize.fake_quantize(torch.zeros(1) + x)[0].item() == 0.0


def test_per_channel_error_not_above_per_tensor() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.logspace(-2, 1, 32).unsqueeze(1)  # rows with very different ranges
    per_tensor = (quantize.fake_quantize(w, symmetric=True) - w).pow(2).mean()
    per_channel = (quantize.fake_quantize(w, symmetric=True, channel_dim=0) - w).pow(2).mean()
    assert per_channel <= per_tensor
    assert per_channel < per_tensor / 10
    scale, _ = quantize.affine_qparams(w, channel_dim=0)
    assert scale.shape == (32, 1)
    with pytest.raises(MfkitError, match="channel_dim"):
        quantize.affine_qparams(w, channel_dim=2)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


class TinyTokenizer:
    """Just enough of a tokenizer for save_quantized: ids from characters, padding to max_length."""

    pad_token_id = 0

    def __call__(self, texts, padding=None, truncation=None, max_length=8, return_tensors=None):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            codes = [1 + ord(c) % 99 for c in text][:max_length]
            ids[i, : len(codes)] = torch.tensor(codes)
            mask[i, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, folder) -> None:
        pass


def test_dynamic_int8_close_to_float_and_smaller() -> None:
    model = tiny_bert()
    ids = torch.randint(1, 100, (4, 12))
    int8 = quantize.quantize_dynamic_int8(model)
    per_channel = quantize.quantize_dynamic_int8(model, per_channel=True)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for variant in (int8, per_channel):
            out = variant(input_ids=ids).logits
            assert torch.allclose(out, ref, atol=0.05)
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert isinstance(model.classifier, nn.Linear)  # the original is left alone
    count = quantize.linear_weight_count(model)
    assert quantize.linear_weight_count(int8) == count
    assert quantize.linear_weight_bytes(model) == 4 * count
    assert 3.5 < quantize.linear_weight_bytes(model) / quantize.linear_weight_bytes(int8) <= 4
    assert quantize.linear_weight_bytes(per_channel) > quantize.linear_weight_bytes(int8)


def test_dynamic_int8_bad_input() -> None:
    with pytest.raises(MfkitError, match="no nn.Linear"):
        quantize.quantize_dynamic_int8(nn.Sequential(nn.ReLU()))


def test_models_compared_side_by_side_are_moved_to_one_device_first() -> None:
    """`fit` leaves a model where it trained (a GPU), a loaded one is on the CPU: notebook 18 times and quantizes
    them side by side. Here the `meta` device stands in for the device they must leave."""
    elsewhere, loaded = tiny_bert().to("meta"), tiny_bert()
    with pytest.raises(MfkitError, match="CPU only"):
        quantize.quantize_dynamic_int8(elsewhere)
    with pytest.raises(MfkitError, match="'trained' cannot be moved to cpu"):
        on_device({"loaded": loaded, "trained": elsewhere}, "cpu")
    moved = on_device({"loaded": loaded, "again": loaded}, "meta")
    assert {t.device.type for m in moved.values() for t in [*m.parameters(), *m.buffers()]} == {"meta"}


def test_notebook_15_moves_its_variants_to_the_cpu_before_timing_and_quantizing() -> None:
    cells = [c["source"] for c in nbformat.read(NOTEBOOKS / "18_pruning.ipynb", as_version=4).cells]
    speed_cell = next(c for c in cells if "quantize_dynamic_int8(" in c and "variants" in c)
    assert "on_device(" in speed_cell
    assert speed_cell.index("on_device(") < speed_cell.index("quantize_dynamic_int8(dense)")


def test_save_reload_identical_predictions(tmp_path) -> None:
    int8 = quantize.quantize_dynamic_int8(tiny_bert())
    tokenizer = TinyTokenizer()
    folder = quantize.save_quantized(int8, tokenizer, tmp_path / "q", max_length=16, card={"note": "test"})
    assert sorted(p.name for p in folder.iterdir()) == ["mfkit.json", "model.pt"]
    scripted = torch.jit.load(str(folder / "model.pt"))  # torch alone
    batch = tokenizer(["free money", "hello there, friend", "x"], max_length=16)
    with torch.no_grad():
        ref = int8(**batch).logits
        assert torch.equal(scripted(batch["input_ids"], batch["attention_mask"])[0], ref)
        short = {k: v[:, :10] for k, v in batch.items()}  # padded back to 16 by the wrapper
        wrapped = quantize.ScriptedClassifier(scripted, max_length=16)
        assert torch.allclose(wrapped(**short).logits, int8(**short).logits, atol=1e-5)
    assert int8.config.return_dict is not False  # tracing left the model as it was


def test_load_missing_names_the_notebook(tmp_path) -> None:
    with pytest.raises(MfkitError, match="17_quantization"):
        quantize.load_quantized(tmp_path / "nothing")


def test_weight_only_formats_and_sizes() -> None:
    pytest.importorskip("torchao")
    model = tiny_bert()
    ids = torch.randint(1, 100, (2, 8))
    float_bytes = quantize.linear_weight_bytes(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for bits in (8, 4):
            variant = quantize.quantize_weight_only(model, bits, group_size=16)
            assert torch.allclose(variant(input_ids=ids).logits, ref, atol=0.1)
            assert quantize.linear_weight_bytes(variant) < float_bytes / 2
    assert quantize.state_dict_mb(quantize.quantize_dynamic_int8(model)) < quantize.state_dict_mb(model)
    with pytest.raises(MfkitError, match="bits"):
        quantize.quantize_weight_only(model, 3)
