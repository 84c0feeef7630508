"""loraft.weights: frozen weights stored in bf16 with the trainable ones and norms in fp32, and the quantization
settings (a missing bitsandbytes is one sentence naming the extra)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraft.errors import MissingExtraError
from loraft.weights import quantization_config


def test_cast_frozen_weights_keeps_trainable_and_norms_in_fp32(tiny_bloom_dir):
    from loraft.config import AdapterConfig
    from loraft.model import attach_adapter
    from loraft.weights import cast_frozen_weights

    model, _ = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir), AdapterConfig())
    expected = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir, dtype=torch.bfloat16)
    assert cast_frozen_weights(model, torch.bfloat16) > 0
    base = model.get_base_model()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or "layernorm" in name or "ln_f" in name:
            assert parameter.dtype == torch.float32, name
    dense = base.transformer.h[3].mlp.dense_h_to_4h
    assert dense.weight.dtype == torch.bfloat16 and not dense.weight.requires_grad
    # the released file pages did not change a value: the same numbers as loading in bf16
    assert torch.equal(dense.weight, expected.transformer.h[3].mlp.dense_h_to_4h.weight)
    # lm_head (tied to the frozen original embedding) is cast; the trained embedding copy is not
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(base.lm_head.weight, expected.lm_head.weight)
    assert base.transformer.word_embeddings.modules_to_save["default"].weight.dtype == torch.float32


def test_missing_bitsandbytes_is_one_sentence_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingExtraError) as error:
        quantization_config("nf4", torch.float32)
    assert str(error.value) == ("model.quantization=nf4 needs the 'qlora' extra (bitsandbytes not installed): run "
                                "pip install 'loraft[qlora]'")
    assert quantization_config("none", torch.float32) is None
