"""How samples become micro-batches: fewer, larger micro-batches and length-grouped sample order.

Two decisions, both measured in docs/benchmarks.md:

- `plan_micro_batches`: the reference accumulates 8 micro-batches of 1 sample. The loss is normalised by the
  supervised tokens of the whole optimizer step (Trainer's num_items_in_batch), so the same samples can run
  as one micro-batch of 8: the same optimizer step, with matmuls large enough for bf16 to pay.
- `LengthGroupedSampler`: samples of similar length share a micro-batch, so padding stays small; the order
  of micro-batches is random. Unlike Trainer's group_by_length (which sorts within mega-batches of 50
  micro-batches and so does nothing on short runs), grouping covers windows of 64 micro-batches.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

GROUP_WINDOW = 64  # micro-batches per sorting window


def plan_micro_batches(batch_size: int, accumulation: int, max_length: int, micro_batch_tokens: int) -> tuple[int, int]:
    """Split the optimizer step's `batch_size * accumulation` samples into the fewest micro-batches whose
    padded size (samples x max_length) fits `micro_batch_tokens`; returns (micro_batch_size, accumulation).

    A budget of 0 keeps the configured split. The micro-batch never gets smaller than `batch_size`.
    """
    step_samples = batch_size * accumulation
    if micro_batch_tokens <= 0:
        return batch_size, accumulation
    for steps in range(1, accumulation + 1):
        if step_samples % steps == 0 and (step_samples // steps) * max_length <= micro_batch_tokens:
            return step_samples // steps, steps
    return batch_size, accumulation


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in an order where each run of `batch_size` holds samples of similar length.

    Each epoch: a seeded permutation, cut into windows of GROUP_WINDOW micro-batches; each window is sorted
    by length and cut into micro-batches; the micro-batches are shuffled, except that the one with the most
    tokens goes first (an out-of-memory shows at step 1, not hours later).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch_size * GROUP_WINDOW
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda index: -self.lengths[index])
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        largest = max(range(len(shuffled)), key=lambda i: max(self.lengths[j] for j in shuffled[i]) * len(shuffled[i]))
        shuffled.insert(0, shuffled.pop(largest))
        return shuffled

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


def sample_lengths(dataset) -> list[int]:
    """Token count of every sample: the data stage's `length` column, else the length of input_ids."""
    if "length" in getattr(dataset, "column_names", []):
        return list(dataset["length"])
    import pyarrow.compute as pc

    table = dataset.data.table if hasattr(dataset, "data") and getattr(dataset, "_indices", None) is None else None
    if table is not None and "input_ids" in table.column_names:
        return pc.list_value_length(table.column("input_ids")).to_pylist()
    return [len(sample["input_ids"]) for sample in dataset]
