"""One decoder layer of a model at its real width, and a timer: what loraft's measurements (loraft.tune's autotune,
loraft.rollout_cost's GRPO estimate) time before a run, on this machine, instead of guessing."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch

from loraft.fastpaths import apply_patch
from loraft.precision import DTYPES


def timed(work: Callable[[], None], repeats: int = 3, enough: float = 1.0) -> float:
    """The best of up to `repeats` timings of `work`; one timing when it takes `enough` seconds or more (a long
    measurement averages out the noise a short one suffers, and the whole autotune has a budget)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
        if best >= enough:
            break
    return best


def layer_config(model_config: Any, vocab_size: int):
    """The architecture with one layer (tied head: only the body runs) and the given vocabulary; special token ids
    the vocabulary cannot hold are dropped (set to None, or left out of a list such as several eos ids)."""
    from transformers import AutoConfig

    config = copy.deepcopy(model_config) if not isinstance(model_config, dict) else AutoConfig.for_model(**model_config)
    # the decoder reads its shape from the text config where the model nests one (the config itself otherwise)
    for part in {id(part): part for part in (config, config.get_text_config(decoder=True))}.values():
        part.num_hidden_layers = 1
        part.vocab_size = vocab_size
        part.tie_word_embeddings = True
        # a pad id past the reduced vocabulary (Phi-3's 32000, fine-tunes with pad = eos) fails nn.Embedding's
        # padding_idx check at construction; the measurement feeds only ids below the vocabulary, so none is needed
        for name, value in list(vars(part).items()):
            if name.endswith(("_token_id", "_token_ids")):
                setattr(part, name, _ids_within(value, vocab_size))
    return config


def _ids_within(value: Any, vocab_size: int) -> Any:
    """A token id (or list of them) with the ids outside [0, vocab_size) left out: None when none is left."""
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        return value
    if isinstance(value, int):
        return value if 0 <= value < vocab_size else None
    kept = [one for one in value if isinstance(one, int) and 0 <= one < vocab_size]
    return kept or None


def library_default_attention(model_config: Any) -> str:
    """The attention transformers picks for this architecture when none is chosen ("sdpa" where the family
    supports it, else "eager"), read from a one-layer copy on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(layer_config(model_config, 8))
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def one_layer_model(model_config: Any, precision: str, attention: str, device: torch.device, vocab_size: int = 512):
    """A one-layer copy of the architecture at its real width, frozen, weights stored as a training run stores
    them; the input embedding trains (at the real vocabulary where the run trains it), so backward runs through
    the layer and into the embedding as in training. `attention`: "patch" (the family's patch over the library's
    default), "library" (transformers' eager attention) or "default" (the library's default, sdpa where supported)."""
    from transformers import AutoModelForCausalLM

    config = layer_config(model_config, vocab_size)
    patched = attention == "patch"
    if attention == "library":
        config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if patched:
        apply_patch(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if precision in ("bf16", "fp16") and parameter.dim() == 2:
            parameter.data = parameter.data.to(DTYPES[precision])
    model.get_input_embeddings().weight.data = model.get_input_embeddings().weight.data.float()
    model.get_input_embeddings().weight.requires_grad_(True)
    return model.to(device).train()
