"""loraft.batching: the micro-batch budget, regrouping a step's samples into sub-batches of bounded padded tokens,
and the length-grouped sampler."""

import pytest
import torch

from loraft.batching import (LengthGroupedSampler, micro_batch_budget, plan_micro_batches, sample_lengths,
                             split_by_tokens)


@pytest.mark.parametrize("setting, precision_name, max_length, expected", [
    ("auto", "fp32", 256, 256), ("auto", "bf16", 256, 1024), ("auto", "fp16", 256, 1024),
    ("auto", "bf16", 64, 256), ("auto", "bf16", 2048, 2048), ("auto", "fp32", 2048, 2048), ("auto", "fp32", 64, 256),
    (512, "fp32", 256, 512), (0, "bf16", 256, 0),
])
def test_micro_batch_budget(setting, precision_name, max_length, expected):
    assert micro_batch_budget(setting, precision_name, max_length) == expected


@pytest.mark.parametrize(
    "batch, accumulation, budget, expected",
    [(1, 8, 1024, (8, 1)), (4, 16, 2048, (64, 1)), (1, 8, 0, (1, 8)), (8, 1, 512, (8, 1))],
)
def test_plan_micro_batches_keeps_the_optimizer_step(batch, accumulation, budget, expected):
    micro, steps = plan_micro_batches(batch, accumulation, budget)
    assert (micro, steps) == expected
    assert micro * steps == batch * accumulation


@pytest.mark.parametrize("budget", [1, 100, 256, 1024, 4096])
def test_split_by_tokens_covers_every_row_once_within_the_budget(budget):
    lengths = torch.randint(1, 300, (37,), generator=torch.Generator().manual_seed(budget)).tolist()
    groups = split_by_tokens(lengths, budget)
    assert sorted(row for group in groups for row in group) == list(range(37))
    for group in groups:
        longest = max(lengths[row] for row in group)
        assert len(group) == 1 or len(group) * longest <= budget
        assert longest == lengths[group[0]]


def test_length_grouped_sampler_is_a_permutation_of_similar_length_batches():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 256, (200,), generator=generator).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    batches = [order[i : i + 8] for i in range(0, 200, 8)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    random_padded = sum(max(lengths[i] for i in order_b) * len(order_b)
                        for order_b in (list(range(200))[i : i + 8] for i in range(0, 200, 8)))
    assert padded < 0.8 * random_padded
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the largest micro-batch first
    assert list(LengthGroupedSampler(lengths, 8, seed=42)) == order  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_sample_lengths_reads_the_length_column_or_input_ids():
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]]})
    assert sample_lengths(data) == [3, 1, 2]
    assert sample_lengths(data.select([2, 0])) == [2, 3]
    assert sample_lengths(data.add_column("length", [30, 10, 20])) == [30, 10, 20]
