"""Per-architecture speed paths, behind one registry keyed by `config.model_type`.

An entry says what loraft may do for an architecture, each thing checked by tests/test_fastpaths.py against the
library's own path (same outputs and gradients):
- `supervised_loss`: the logits are exactly lm_head(last hidden state) (no bias, scaling or soft-capping after
  it), so loraft.loss may run lm_head and the cross-entropy only at supervised positions;
- `patch`: a replacement of library forwards for this one model instance (BLOOM's SDPA-alibi attention and
  one-kernel GELU), applied at load under the default or "sdpa" attention implementation;
- `packing`: how packed samples (loraft.packing) are kept from attending to each other: "position_ids" (the
  library builds a block-diagonal mask from restarting positions when no attention mask is given) or "segments"
  (the patch masks across sample ids, for BLOOM, whose alibi ignores positions); None = no packing;
- `description`: what the plan (train.log, `loraft plan`) says the patch does.
Sub-batching (loraft.batching) needs nothing per architecture. A new family is one entry here (plus its module
when it has a patch) and one parametrization in the tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class FastPath:
    """What loraft speeds up for one architecture (see the module docstring)."""

    description: str = ""
    supervised_loss: bool = True
    patch: Optional[Callable[[torch.nn.Module], int]] = None
    packing: Optional[str] = "position_ids"


def _bloom_patch(model: torch.nn.Module) -> int:
    from loraft.fastpaths.bloom import use_fast_bloom

    return use_fast_bloom(model)


REGISTRY: dict[str, FastPath] = {
    # BLOOM has no SDPA in transformers: loraft provides it on the default implementation
    "bloom": FastPath("BLOOM SDPA-alibi attention and one-kernel GELU", patch=_bloom_patch,
                      packing="segments"),
    "llama": FastPath(),
    "mistral": FastPath(),
    "qwen2": FastPath(),
    "qwen3": FastPath(),
    "phi3": FastPath(),
    "gpt2": FastPath(),
    "gpt_neox": FastPath(),
}


def model_type(model: torch.nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def fast_path(model_or_type) -> Optional[FastPath]:
    """The registry entry for a model (or a model_type string), None for an architecture loraft has none for."""
    key = model_or_type if isinstance(model_or_type, str) else model_type(model_or_type)
    return REGISTRY.get(key)


def patches_on_load(model_type_name: str, attn_implementation: Optional[str]) -> bool:
    """Whether loading applies the entry's patch: it replaces the default ("sdpa") attention, never a chosen one."""
    entry = REGISTRY.get(model_type_name)
    return entry is not None and entry.patch is not None and attn_implementation in (None, "sdpa")


def apply_patch(model: torch.nn.Module) -> int:
    """Apply the architecture's patch to this model instance; returns how many modules it replaced (0: none)."""
    entry = fast_path(model)
    return entry.patch(model) if entry is not None and entry.patch is not None else 0


def supports_supervised_loss(model: torch.nn.Module) -> bool:
    """Whether `model`'s logits are exactly lm_head(last hidden state), so the fused loss may replace them."""
    entry = fast_path(model)
    if entry is None or not entry.supervised_loss:
        return False
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear) and head.bias is None and getattr(model, "base_model", None) is not model


@contextlib.contextmanager
def packed_segments(model: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    """While a packed row runs forward and backward (recomputed forwards included), tell an architecture that
    separates samples by segment ids (BLOOM) where each sample starts; a no-op for position_ids architectures."""
    entry = fast_path(model)
    if entry is None or entry.packing != "segments":
        yield
        return
    from loraft.fastpaths.bloom import shared_bias

    bias = shared_bias(model)
    bias.segments = (position_ids == 0).cumsum(dim=-1)
    try:
        yield
    finally:
        bias.segments = None
