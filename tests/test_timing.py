"""Latency (warm-up, synchronize, median, eval mode) and peak memory above a baseline, without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfkit import timing
from mfkit.errors import MfkitError


class Counting(nn.Module):
    """A model that records each call's mode and whether gradients were on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.linear(x)


def test_latency_warms_up_syncs_every_timed_call_and_restores_the_mode(monkeypatch):
    model = Counting().train()
    synced = []
    monkeypatch.setattr(timing, "synchronize", lambda device: synced.append(torch.device(device).type))
    ms = timing.latency_ms(model, {"x": torch.ones(3, 4), "labels": torch.zeros(3)}, repeats=5, warmup=3)
    assert ms > 0
    assert len(model.calls) == 8 and all(c == (False, False) for c in model.calls)  # eval mode, no gradients
    assert synced == ["cpu"] * 10  # before and after each of the 5 timed calls, none around the warm-up
    assert model.training


def test_latency_is_the_median_of_the_repeats(monkeypatch):
    clock = iter([0.0, 0.001, 1.0, 1.100, 2.0, 2.003])  # calls of 1 ms, 100 ms (an outlier), 3 ms
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    assert timing.latency_ms(Counting(), {"x": torch.ones(1, 4)}, repeats=3, warmup=0) == pytest.approx(3.0)


def test_latency_rejects_bad_counts():
    with pytest.raises(MfkitError, match="repeats"):
        timing.latency_ms(Counting(), {"x": torch.ones(1, 4)}, repeats=0)
    with pytest.raises(MfkitError, match="warmup"):
        timing.latency_ms(Counting(), {"x": torch.ones(1, 4)}, warmup=-1)


def test_synchronize_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    timing.synchronize("cpu")
    assert calls == []
    timing.synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def fake_cuda(monkeypatch, allocated: list[int], peak: list[int]) -> list[str]:
    """Stand-ins for the CUDA memory counters; returns the log of frees and resets."""
    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[0])
    monkeypatch.setattr(timing.gc, "collect", lambda: log.append("gc") or 0)
    return log


def test_peak_memory_counts_only_what_the_variant_added(monkeypatch):
    mb = 2**20
    allocated, peak = [100 * mb], [100 * mb]
    log = fake_cuda(monkeypatch, allocated, peak)
    window = timing.MemoryWindow.start("cuda")
    assert log == ["gc", "empty_cache", "reset"]  # garbage freed before the baseline is taken
    peak[0] = 350 * mb  # an earlier model of 100 MB is still alive: the absolute peak would say 350
    assert window.peak_mb() == pytest.approx(250.0)
    assert window.kind == "cuda peak above start"


def test_free_memory_collects_and_empties_the_cache(monkeypatch):
    log = fake_cuda(monkeypatch, [3 * 2**20], [0])
    assert timing.free_memory("cuda") == pytest.approx(3.0)
    assert log == ["gc", "empty_cache"]


def test_peak_memory_off_cuda_is_not_a_number():
    window = timing.MemoryWindow.start("cpu")
    assert math.isnan(window.peak_mb()) and "unavailable" in window.kind
