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


def _resident_bytes_of(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="MADV_DONTNEED on Linux only")
def test_a_cast_releases_the_checkpoint_pages_it_read_and_keeps_the_values(tmp_path):
    """The pages of the memory-mapped checkpoint that a cast replaced leave RSS; a weight another module still
    uses (the tied embedding) keeps its pages, and every value is the one loading in bf16 gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraft.weights import cast_frozen_weights

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    checkpoint = (tmp_path / "model.safetensors").resolve()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).requires_grad_(False)
    sum(float(parameter.sum()) for parameter in model.parameters())  # every page read
    before = _resident_bytes_of(checkpoint)
    linear = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    if before < linear:
        pytest.skip("from_pretrained did not map the checkpoint here")  # the check needs a mapped file
    assert cast_frozen_weights(model, torch.bfloat16) == 2 * 7 + 1
    after = _resident_bytes_of(checkpoint)
    assert before - after >= linear * 0.9, (before, after, linear)  # the linear layers' pages left
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for (name, parameter), reference in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(parameter.to(torch.bfloat16), reference), name


def test_missing_bitsandbytes_is_one_sentence_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingExtraError) as error:
        quantization_config("nf4", torch.float32)
    assert str(error.value) == ("model.quantization=nf4 needs the 'qlora' extra (bitsandbytes not installed): run "
                                "pip install 'loraft[qlora]'")
    assert quantization_config("none", torch.float32) is None
