"""Packing without cross-attention: an optimizer step's samples concatenated into rows instead of padded.

The step keeps its samples (the same ones, the same loss normalisation over their supervised tokens); only how
they are laid out for the forward pass changes. Each row is as long as the step's longest sample and holds whole
samples placed first-fit-decreasing; rows are stacked into sub-batches of at most micro_batch_tokens tokens.
No token attends across a sample boundary:
- `position_ids` restart at 0 for each sample; with no attention mask, transformers' mask builder turns them into
  a block-diagonal causal mask, and rotary positions are each sample's own (Llama, Mistral, Qwen2, ...);
- BLOOM's alibi ignores positions, so loraft's SDPA path masks across the samples' segment ids
  (loraft.fastpaths.bloom; alibi is relative, so each sample sees the same biases as alone).
The first label of each sample is -100: shifted, it would be predicted from the previous sample's last token.
Loss and gradients equal the padded step's (tests/test_packing.py); the speed is in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100


def plan_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows of at most `budget` tokens (each sample whole)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        for row, left in enumerate(room):
            if length <= left:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(max(budget - length, 0))
    return rows


def unpad(inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of each sample of a padded batch (right or left padding), by its attention mask."""
    mask = inputs["attention_mask"].bool()
    return [(inputs["input_ids"][row][mask[row]], inputs["labels"][row][mask[row]]) for row in range(mask.shape[0])]


def pack_row(samples: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int = 0, pad_id: int = 0) -> dict:
    """One packed row: input_ids, labels (each sample's first label -100) and position_ids restarting per sample,
    filled up to `length` with a padding segment of its own (labels -100), so rows stack into one batch."""
    fill = max(length - sum(len(ids) for ids, _ in samples), 0)
    device = samples[0][0].device
    if fill:
        samples = [*samples, (torch.full((fill,), pad_id, dtype=samples[0][0].dtype, device=device),
                              torch.full((fill,), IGNORE_INDEX, dtype=samples[0][1].dtype, device=device))]
    input_ids = torch.cat([ids for ids, _ in samples])
    labels = torch.cat([labels for _, labels in samples]).clone()
    position_ids = torch.cat([torch.arange(len(ids), device=device) for ids, _ in samples])
    start = 0
    for ids, _ in samples:
        labels[start] = IGNORE_INDEX
        start += len(ids)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def pack_batch(inputs: dict, budget: int) -> list[dict]:
    """A padded step batch as sub-batches of packed rows: rows as long as the step's longest sample, filled
    first-fit decreasing, stacked `budget // row length` rows (at least one) per sub-batch. Attention stays within
    rows as long as the samples' own (no quadratic cost over a long row), and only the rows' tails are padding."""
    samples = unpad(inputs)
    length = max(len(ids) for ids, _ in samples)
    rows = [pack_row([samples[i] for i in row], length) for row in plan_rows([len(s[0]) for s in samples], length)]
    per_batch = max(budget // length, 1)
    batches = []
    for start in range(0, len(rows), per_batch):
        group = rows[start:start + per_batch]
        batch = {key: torch.stack([row[key] for row in group]) for key in group[0]}
        batches.append({**batch, "use_cache": False})
    return batches
