"""Honest time and memory figures for notebooks: forward latency, peak memory of one variant, freeing a model.

On a GPU, kernels run asynchronously: `model(**inputs)` returns as soon as the work is queued, so a timer read
right after it measures the queueing, not the computation. `latency_ms` waits for the device (`synchronize`)
before reading the clock, runs a few untimed warm-up calls first (the first calls pay for memory allocation,
kernel selection and caches), and reports the median of the repeats (robust to an occasional slow call).

`torch.cuda.max_memory_allocated` is the peak since the last reset, and it counts every tensor alive, including
earlier models that are still referenced (or only waiting for the garbage collector). `MemoryWindow` measures
one variant: it frees what can be freed, resets the peak, remembers what is in use at that moment, and reports
the peak *above* it. Between variants: `del model` (and every other reference to it), then `free_memory()`.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MfkitError, check_positive


def synchronize(device: torch.device | str) -> None:
    """Wait until every kernel queued on `device` has finished (a no-op on the CPU, whose calls are synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def on_device(models: Mapping[str, nn.Module], device: torch.device | str) -> dict[str, nn.Module]:
    """Move every model of a comparison to `device` (in place, like `nn.Module.to`) and return them by name.

    Models that are timed or scored side by side must run in one place: `fit` leaves a model on the GPU, a model
    loaded from disk is on the CPU, and a table of the two would compare the devices, not the models. A model
    that cannot be moved there (weights on the `meta` device, i.e. never loaded) raises `MfkitError` by name.
    """
    device = torch.device(device)
    moved = {}
    for name, model in models.items():
        try:
            model.to(device)
        except NotImplementedError as exc:  # torch: "Cannot copy out of meta tensor; no data!"
            raise MfkitError(
                f"{name!r} cannot be moved to {device}: its weights were never loaded ({exc}).",
                "load or train the model before comparing it.",
            ) from exc
        where = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
        if any(torch.device(w).type != device.type for w in where):
            raise MfkitError(
                f"{name!r} still has tensors on {where} after moving it to {device}.",
                "check that the model keeps no tensors outside its parameters and buffers.",
            )
        moved[name] = model
    return moved


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`, without `labels` (a forward pass for timing computes no loss)."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def latency_ms(
    model: nn.Module, batch: Mapping[str, torch.Tensor], repeats: int = 10, warmup: int = 2
) -> float:
    """Median wall time in milliseconds of one forward pass of `model` on `batch` (eval mode, no gradients).

    `warmup` untimed calls come first; every timed call is bracketed by `synchronize`, so on a GPU the time is
    that of the computation, not of queueing it. The model's train/eval mode is restored afterwards.
    """
    check_positive("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise MfkitError(
            f"warmup={warmup!r} must be a whole number of calls, 0 or more.", "pass e.g. warmup=2."
        )
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(**inputs)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model(**inputs)
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000 * statistics.median(times)


def free_memory(device: torch.device | str | None = None) -> float:
    """Collect garbage (models held by reference cycles) and return cached CUDA blocks to the driver.

    Delete your own references first (`del model`): memory still referenced cannot be freed. Returns the MB still
    allocated by tensors on `device` (CUDA), 0.0 elsewhere.
    """
    gc.collect()
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(device) / 2**20
    return 0.0


@dataclass
class MemoryWindow:
    """Peak memory of one piece of work above what was in use when the window opened (CUDA).

        window = MemoryWindow.start(env.device)   # frees garbage, resets the peak, notes memory in use
        ...train or evaluate one variant...
        window.peak_mb()                          # peak minus the memory in use at start

    On a CPU or MPS device there is no resettable peak: `peak_mb()` returns nan, and `kind` says so.
    """

    device: torch.device
    baseline_bytes: int

    @classmethod
    def start(cls, device: torch.device | str, collect: bool = True) -> MemoryWindow:
        """Open a window on `device`; `collect=False` skips freeing garbage first (the caller holds what counts)."""
        device = torch.device(device)
        if collect:
            free_memory(device)
        if device.type != "cuda":
            return cls(device, 0)
        torch.cuda.reset_peak_memory_stats(device)
        return cls(device, torch.cuda.memory_allocated(device))

    @property
    def kind(self) -> str:
        return "cuda peak above start" if self.device.type == "cuda" else "unavailable on this device"

    def peak_mb(self) -> float:
        """MB allocated at the peak since `start`, minus what was allocated at `start` (nan off CUDA)."""
        if self.device.type != "cuda":
            return float("nan")
        return (torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes) / 2**20
