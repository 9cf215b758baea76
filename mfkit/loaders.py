"""Data loaders whose order is a pure function of (seed, epoch): a resumed run sees exactly the same batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import check_positive


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by `seed + epoch`; `set_epoch` is called by accelerate each epoch.

    Unlike a `RandomSampler` that draws from global RNG state, the order of epoch `e` can be recomputed at any time,
    which is what makes exact resumption and identical shards across processes possible.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def pad_collate(pad_id: int, label_pad_id: int = -100) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
    """Dynamic padding: pad each batch only to its own longest sequence.

    Sequence fields (`input_ids`, `attention_mask`, `token_type_ids`, list `labels`) are right-padded; scalar
    `labels` become a 1-D tensor. Padded label positions get -100, which cross-entropy ignores.
    """

    def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if isinstance(values[0], list | tuple):
                fill = {"input_ids": pad_id, "labels": label_pad_id}.get(key, 0)
                values = [list(v) + [fill] * (longest - len(v)) for v in values]
            batch[key] = torch.tensor(values)
        return batch

    return collate


def make_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` in a reproducible order (see `EpochSampler`).

    Pinned (page-locked) host memory lets host-to-device copies run asynchronously (`non_blocking`); by default
    it is on exactly when a CUDA device is present.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    check_positive("batch_size", batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle=shuffle, seed=seed),
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: creating an epoch's iterator then draws no number from the global RNG, so dropout
        # masks after a resume are the ones an uninterrupted run would have drawn.
        generator=torch.Generator().manual_seed(seed),
    )
