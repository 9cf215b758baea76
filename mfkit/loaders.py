"""Data loaders whose order is a pure function of (seed, epoch): a resumed run sees exactly the same batches.

Two shuffled orders: `EpochSampler` (random batches) and `LengthGroupedSampler` (batches of examples of similar
length, so dynamic padding pads little; see `make_loader(..., group_by_length=True)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import MfkitError, check_positive


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


class LengthGroupedSampler(Sampler[int]):
    """Shuffled batches of examples of similar length; the order is a pure function of (seed, epoch).

    Each epoch: shuffle all indices; cut them into pools of `pool_batches` batches; sort each pool by length
    (longest first) and cut it into batches; shuffle the order of the batches, except that the longest batch comes
    first (a batch too big for the device fails on the first step, not hours in) and a short remainder batch comes
    last. Used with `DataLoader(batch_size=batch_size)`, every batch the loader forms is one of these groups, so
    accelerate's sharding (whole batches dealt to processes in turn) keeps them intact.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, pool_batches: int = 50
    ) -> None:
        check_positive("batch_size", batch_size)
        check_positive("pool_batches", pool_batches)
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.pool_batches = pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches of indices, in the order they are served."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        pool = self.batch_size * self.pool_batches  # a multiple of batch_size: no batch spans two pools
        longest_first = [
            sorted(order[s : s + pool], key=lambda i: -self.lengths[i]) for s in range(0, len(order), pool)
        ]
        grouped = [i for chunk in longest_first for i in chunk]
        batches = [grouped[s : s + self.batch_size] for s in range(0, len(grouped), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        if not batches:
            return tail
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        first = batches.pop(longest)
        rest = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
        return [first, *rest, *tail]

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])


def sequence_lengths(dataset: Dataset, column: str = "input_ids") -> list[int]:
    """The length of `column` in every row (read as one column when `dataset` is a `datasets.Dataset`)."""
    if len(dataset) == 0:
        return []
    first = dataset[0]
    if not isinstance(first, dict) or column not in first:
        keys = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise MfkitError(
            f"Cannot group by length: the rows have no {column!r} field (they have {keys}).",
            "tokenize the data first, or pass the lengths yourself to LengthGroupedSampler.",
        )
    names = getattr(dataset, "column_names", None)
    values = dataset[column] if names is not None else (row[column] for row in dataset)
    return [len(v) for v in values]


def pad_collate(pad_id: int, label_pad_id: int = -100) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
    """Dynamic padding: pad each batch only to its own longest sequence.

    Sequence fields (`input_ids`, `attention_mask`, `token_type_ids`, list `labels`) are right-padded; scalar
    `labels` become a 1-D tensor. Padded label positions get -100, which cross-entropy ignores. Kept instead of
    transformers' collators because one function serves classification, language-model and tagging rows alike
    and needs no tokenizer object (`DataCollatorWithPadding` pads no list labels; the token-classification and
    seq2seq collators need a tokenizer, which the tests' tiny models and the DDP workers do not have).
    """

    def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if isinstance(values[0], list | tuple):
                fill = {"input_ids": pad_id, "labels": label_pad_id}.get(key, 0)
                sequences = [torch.tensor(v) for v in values]
                batch[key] = pad_sequence(sequences, batch_first=True, padding_value=fill)
            else:
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
    group_by_length: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset` in a reproducible order (see `EpochSampler`).

    `group_by_length=True` batches rows of similar `input_ids` length (see `LengthGroupedSampler`): with dynamic
    padding, far fewer padding tokens when lengths vary. It needs `shuffle=True`.

    Pinned (page-locked) host memory lets host-to-device copies run asynchronously (`non_blocking`); by default
    it is on exactly when a CUDA device is present.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    check_positive("batch_size", batch_size)
    if group_by_length and not shuffle:
        raise MfkitError(
            "group_by_length=True reorders the rows, but shuffle=False asks for them in order.",
            "group by length only the shuffled training loader; keep evaluation loaders in order.",
        )
    sampler: Sampler[int] = (
        LengthGroupedSampler(sequence_lengths(dataset), batch_size, seed=seed)
        if group_by_length
        else EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: creating an epoch's iterator then draws no number from the global RNG, so dropout
        # masks after a resume are the ones an uninterrupted run would have drawn.
        generator=torch.Generator().manual_seed(seed),
    )
