"""How samples become micro-batches: one batch per optimizer step, split by a token budget, length-grouped order.

Three decisions, all measured in docs/benchmarks.md:

- `plan_micro_batches`: the reference accumulates 8 micro-batches of 1 sample. The loss is normalised by the
  supervised tokens of the whole optimizer step (Trainer's num_items_in_batch), so the step's samples are
  collated as one batch: the same optimizer step, with matmuls large enough for bf16 to pay.
- `split_by_tokens`: that batch runs forward/backward in sub-batches of at most `micro_batch_tokens` padded
  tokens, longest samples together, so activation memory is bounded and little of it is padding.
- `LengthGroupedSampler`: samples of similar length share an optimizer step, so padding stays small; the
  order of steps is random. Unlike Trainer's group_by_length (which sorts within mega-batches of 50
  micro-batches and so does nothing on short runs), grouping covers windows of 64 steps.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

GROUP_WINDOW = 64  # micro-batches per sorting window


# Sub-batch budgets for `train.micro_batch_tokens: auto`, measured at the bloom-1b4-zh shape (docs/benchmarks.md)
HALF_PRECISION_TOKENS = 1024
# Below this many tokens a sub-batch is too small for the matmuls to run at speed (short max_length: the
# activations of 256 tokens are small next to the weights)
FP32_MIN_TOKENS = 256


def micro_batch_budget(setting, precision: str, max_length: int) -> int:
    """The sub-batch token budget: `setting` when it is a number, else sized from the precision.

    The reference trains one sample at a time, so its activation memory is that of one sample of at most
    `max_length` tokens in fp32. In fp32 a sub-batch of at most max_length padded tokens holds no more
    activations than that (several short samples share it); at least FP32_MIN_TOKENS. Under bf16/fp16 the activations take about
    half the bytes and the frozen weights are stored in half precision too, which frees room for sub-batches
    of 4 x max_length tokens, up to HALF_PRECISION_TOKENS (larger ones measured no faster).
    """
    if setting != "auto":
        return int(setting)
    if precision == "fp32":
        return max(max_length, FP32_MIN_TOKENS)
    return max(max_length, min(4 * max_length, HALF_PRECISION_TOKENS))


def plan_micro_batches(batch_size: int, accumulation: int, micro_batch_tokens: int) -> tuple[int, int]:
    """(samples per collated batch, accumulation steps): the whole optimizer step as one batch when a token
    budget splits it (`split_by_tokens`), else the configured split (a budget of 0)."""
    if micro_batch_tokens <= 0:
        return batch_size, accumulation
    return batch_size * accumulation, 1


def split_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group row indices, longest first, into sub-batches whose padded size (rows x longest) fits `budget`.

    A row longer than the budget gets a sub-batch of its own. Every row appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    groups: list[list[int]] = []
    for row in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


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
