"""The inference harness: fixed-length batches, pinned threads, latency and throughput, size on disk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfkit import inference
from mfkit.errors import MfkitError


class FakeTokenizer:
    """Pads or cuts word lists to `max_length` ids, like a tokenizer with padding="max_length"."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        ids = [[len(w) for w in t.split()][:max_length] for t in texts]
        ids = [row + [0] * (max_length - len(row)) for row in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) > 0).long()}


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.shapes: list[tuple[int, ...]] = []
        self.threads: list[int] = []

    def forward(self, input_ids, attention_mask):
        self.shapes.append(tuple(input_ids.shape))
        self.threads.append(torch.get_num_threads())
        return input_ids.float().sum()


def test_every_batch_has_the_fixed_length_and_the_large_batch_cycles_the_texts():
    batch = inference.fixed_length_batch(FakeTokenizer(), ["a bb ccc", "dddd"], max_length=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]]
    model = Recorder()
    speed = inference.measure_speed(
        model, FakeTokenizer(), ["a bb", "ccc"], max_length=4, batch_size=6, repeats=3
    )
    assert set(model.shapes) == {(1, 4), (6, 4)}
    assert speed.batch_size == 6 and speed.latency_ms > 0 and speed.throughput > 0


def test_threads_are_pinned_while_measuring_and_restored_after():
    before = torch.get_num_threads()
    model = Recorder()
    speed = inference.measure_speed(
        model, FakeTokenizer(), ["a"], max_length=2, batch_size=2, threads=1, repeats=3
    )
    assert set(model.threads) == {1} and speed.threads == 1
    assert torch.get_num_threads() == before


def test_throughput_is_mails_per_second_of_the_median_batch_time(monkeypatch):
    times = iter([5.0, 40.0])  # ms at batch 1, ms at batch 8
    monkeypatch.setattr(inference, "latency_ms", lambda *a, **k: next(times))
    speed = inference.measure_speed(Recorder(), FakeTokenizer(), ["a"], max_length=2, batch_size=8)
    assert speed.latency_ms == 5.0 and speed.throughput == pytest.approx(200.0)


def test_size_on_disk_counts_every_file_and_names_a_missing_path(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.bin").write_bytes(b"x" * 1500)
    (tmp_path / "m" / "sub").mkdir()
    (tmp_path / "m" / "sub" / "b.bin").write_bytes(b"x" * 500)
    assert inference.size_on_disk_mb(tmp_path / "m") == pytest.approx(0.002)
    with pytest.raises(MfkitError, match="does not exist"):
        inference.size_on_disk_mb(tmp_path / "missing")
    with pytest.raises(MfkitError, match="no texts"):
        inference.fixed_length_batch(FakeTokenizer(), [], 4)
