"""The one masked encoder: template segments -> (input_ids, labels), prompt labels -100.

Training (loraft.data) and generation (loraft.generate) both encode through here, so a prompt is tokenized at
inference exactly as it was in training.
"""

from __future__ import annotations

from typing import Sequence

from loraft.templates import Segment


class BatchEncoder:
    """Tokenizes a list of texts exactly as `tokenizer(text, add_special_tokens=...)` does, one call per list.

    tokenizers' Rust `encode_batch_fast` skips transformers' per-call Python work (measured 9 s vs 17.5 s
    for 51k records). The first list of each kind is checked against `tokenizer(...)`, and any difference
    falls back to the transformers call, so the ids are always the tokenizer's own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self.checked: set[bool] = set()

    def __call__(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        if self.encode is not None:
            ids = [encoding.ids for encoding in self.encode(texts, add_special_tokens=add_special_tokens)]
            if add_special_tokens in self.checked:
                return ids
            self.checked.add(add_special_tokens)
            probe = self.tokenizer(texts[:64], add_special_tokens=add_special_tokens)["input_ids"]
            if [list(p) for p in probe] == ids[:64]:
                return ids
            self.encode = None
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def encode_rendered(rendered: Sequence[Sequence[Segment]],
                    encoder: BatchEncoder) -> list[tuple[list[int], list[int]]]:
    """The one masked encoder: tokenize each conversation's segments one by one into (input_ids, labels), labels
    -100 on prompt tokens, as the reference recipe tokenizes its prompt and its response separately.

    The first segment gets the tokenizer's special tokens (BOS where the model uses one) unless the template wrote
    the BOS itself (Llama-3's `{{ bos_token }}`): a BOS is never doubled, nor repeated mid-sequence. BLOOM adds no
    special tokens, so this equals the reference's `tokenizer(prompt)` + `tokenizer(response)` exactly.
    """
    bos = getattr(encoder.tokenizer, "bos_token", None)
    own_bos = [bool(bos) and bool(segments) and segments[0].text.startswith(bos) for segments in rendered]
    with_specials = iter(encoder([s[0].text for s, own in zip(rendered, own_bos) if s and not own], True))
    pieces = [s.text for segments, own in zip(rendered, own_bos) for s in (segments if own else segments[1:])]
    without = iter(encoder(pieces, False))
    rows = []
    for segments, own in zip(rendered, own_bos):
        input_ids: list[int] = []
        labels: list[int] = []
        for index, segment in enumerate(segments):
            ids = next(with_specials) if index == 0 and not own else next(without)
            input_ids += ids
            labels += ids if segment.supervised else [-100] * len(ids)
        rows.append((input_ids, labels))
    return rows


def encode_segments(tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
    """One conversation's segments as (input_ids, labels): what generation encodes a prompt with."""
    return encode_rendered([segments], BatchEncoder(tokenizer))[0]


def right_pad_scored(rows: Sequence[tuple[Sequence[int], int]], pad_id: int):
    """Rows of (token ids, first scored position), right-padded into one batch: (input_ids, attention_mask, scored),
    where `scored` marks the positions first .. len-2 of each row (those whose next token is scored)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (ids, first) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(list(ids))
        mask[row, :len(ids)] = 1
        scored[row, first:len(ids) - 1] = True
    return input_ids, mask, scored
