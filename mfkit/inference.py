"""Prediction cost of a classifier, measured the same way for every variant: latency, throughput, size.

Every compressed variant (a distilled student, an int8 model, a pruned model) is compared with the model it came
from on the same inputs: mails padded to one fixed length (so every variant does the same work), torch's thread
count pinned for the measurement (so a variant cannot win by using more cores), warm-up calls first, the median
of the timed calls. Latency is the time of one forward pass at batch 1 (one user waiting); throughput is mails per
second at a large batch (a backlog processed offline).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MfkitError, check_positive
from .timing import latency_ms


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to `threads`, then restore the previous count."""
    check_positive("threads", threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fixed_length_batch(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """`texts` tokenized and padded (or cut) to exactly `max_length` tokens: the same work for every variant."""
    if not texts:
        raise MfkitError("no texts to time.", "pass at least one text (e.g. a few test mails).")
    return dict(
        tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
    )


@dataclass(frozen=True)
class Speed:
    """Median latency of one mail, throughput at `batch_size` mails, and the threads both were measured with."""

    latency_ms: float
    throughput: float
    batch_size: int
    threads: int

    def row(self) -> dict[str, float]:
        return asdict(self)


def measure_speed(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 32,
    threads: int | None = None,
    repeats: int = 10,
    warmup: int = 3,
) -> Speed:
    """Latency at batch 1 and throughput (mails/s) at `batch_size`, with pinned threads and warm-up.

    The texts are cycled to fill the large batch. `threads=None` keeps torch's current count. The model runs
    where its parameters are (a quantized model without float parameters runs on the CPU).
    """
    check_positive("batch_size", batch_size)
    threads = threads or torch.get_num_threads()
    one = fixed_length_batch(tokenizer, texts[:1], max_length)
    many = fixed_length_batch(tokenizer, [texts[i % len(texts)] for i in range(batch_size)], max_length)
    with pinned_threads(threads):
        single = latency_ms(model, one, repeats=repeats, warmup=warmup)
        batched = latency_ms(model, many, repeats=max(3, repeats // 3), warmup=1)
    return Speed(
        latency_ms=single, throughput=1000 * batch_size / batched, batch_size=batch_size, threads=threads
    )


def size_on_disk_mb(path: str | os.PathLike) -> float:
    """Megabytes (10**6 bytes) of a saved model: the file, or every file under the folder."""
    path = Path(path)
    if not path.exists():
        raise MfkitError(
            f"{path} does not exist.", "save the model first, or pass the folder it was saved to."
        )
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def saved_weights_mb(model: nn.Module) -> float:
    """Megabytes of the model's weights saved with `torch.save(model.state_dict())`: one measure for float and
    quantized models alike (a dynamic-int8 model keeps its packed int8 weights and their scales there)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mfkit-size-") as folder:
        path = Path(folder) / "weights.pt"
        torch.save(model.state_dict(), path)
        return size_on_disk_mb(path)
