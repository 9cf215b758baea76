"""mfkit.loaders: the length-grouped sampler (coverage, grouping, order = f(seed, epoch), sharding) and make_loader."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset

from mfkit.errors import MfkitError
from mfkit.loaders import EpochSampler, LengthGroupedSampler, make_loader, pad_collate, sequence_lengths

RNG = random.Random(7)
LENGTHS = [RNG.randint(3, 512) for _ in range(203)]  # 15 full batches of 16 and a remainder of 11


def padded_fraction(batches: list[list[int]]) -> float:
    """Share of the padded batch tensors that is padding."""
    padded = sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)
    return 1 - sum(LENGTHS[i] for b in batches for i in b) / padded


def test_every_index_exactly_once_per_epoch():
    sampler = LengthGroupedSampler(LENGTHS, batch_size=16, seed=3, pool_batches=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(len(LENGTHS)))
        assert len(sampler) == len(LENGTHS)


def test_batches_group_similar_lengths():
    sampler = LengthGroupedSampler(LENGTHS, batch_size=16, seed=0)
    batches = sampler.batches()
    assert [len(b) for b in batches] == [16] * 12 + [11]  # full batches, the short remainder last
    random_batches = [list(range(s, min(s + 16, len(LENGTHS)))) for s in range(0, len(LENGTHS), 16)]
    assert padded_fraction(random_batches) > 0.4  # uniform lengths 3-512: random batches are mostly padding
    assert padded_fraction(batches) < 0.1  # 16 batches over lengths 3-512: each spans ~40 tokens
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)  # the longest batch comes first


def test_pools_bound_the_grouping():
    # pools of one batch sort nothing across batches (as wasteful as random batches); bigger pools group finer
    waste = [
        padded_fraction(LengthGroupedSampler(LENGTHS, 16, seed=0, pool_batches=p).batches())
        for p in (1, 4, 50)
    ]
    assert waste[0] > 0.4 and waste[0] > waste[1] + 0.15 and waste[1] > waste[2] + 0.1


def test_order_is_a_function_of_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = LengthGroupedSampler(LENGTHS, batch_size=16, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 2) == order(1, 2)
    assert order(1, 2) != order(1, 3)
    assert order(1, 2) != order(2, 2)


@pytest.mark.parametrize("drop_last", [False, True])
def test_make_loader_group_by_length_serves_the_groups(drop_last):
    rows = [{"input_ids": list(range(n)), "labels": n % 2} for n in LENGTHS]
    loader = make_loader(rows, 16, pad_collate(0), seed=5, group_by_length=True, drop_last=drop_last)
    loader.sampler.set_epoch(1)
    expected = loader.sampler.batches()[: 12 if drop_last else None]
    served = [batch["labels"].tolist() for batch in loader]
    assert served == [[LENGTHS[i] % 2 for i in b] for b in expected]
    assert next(iter(loader))["input_ids"].shape[1] == max(
        LENGTHS
    )  # padded only to its own (the longest) group


def test_accelerate_sharding_keeps_batches_whole_and_covers_the_epoch():
    lengths = LENGTHS[:192]  # 15 batches: 6 per process
    rows = [{"input_ids": [1] * n, "index": i} for i, n in enumerate(lengths)]
    shards = []
    for rank in range(2):
        loader = make_loader(rows, 16, pad_collate(0), seed=2, group_by_length=True)
        shards.append(
            prepare_data_loader(
                loader, torch.device("cpu"), num_processes=2, process_index=rank, put_on_device=False
            )
        )
    for epoch in (0, 1):
        expected = LengthGroupedSampler(lengths, 16, seed=2)
        expected.set_epoch(epoch)
        served = []
        for shard in shards:
            shard.set_epoch(epoch)
            served.append([batch["index"].tolist() for batch in shard])
        assert served[0] == expected.batches()[0::2] and served[1] == expected.batches()[1::2]
        assert sorted(i for shard in served for b in shard for i in b) == list(range(192))


def test_group_by_length_reads_a_datasets_column():
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in LENGTHS[:40]], "labels": [0] * 40})
    assert sequence_lengths(ds) == LENGTHS[:40]
    loader = make_loader(ds, 8, pad_collate(0), group_by_length=True)
    assert isinstance(loader.sampler, LengthGroupedSampler) and loader.sampler.lengths == LENGTHS[:40]
    assert isinstance(make_loader(ds, 8, pad_collate(0)).sampler, EpochSampler)  # the default is unchanged


def test_group_by_length_errors_name_the_fix():
    with pytest.raises(MfkitError, match="shuffle=False"):
        make_loader([{"input_ids": [1]}], 4, group_by_length=True, shuffle=False)
    with pytest.raises(MfkitError, match="no 'input_ids' field"):
        make_loader([{"text": "a"}], 4, group_by_length=True)
    with pytest.raises(MfkitError, match="batch_size"):
        LengthGroupedSampler([1, 2], 0)
