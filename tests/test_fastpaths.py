"""The fast-path registry: every registered architecture gets the supervised-only loss and the sub-batched step
with the library's own loss and gradients; loading applies (only) the registered patches; the log says so."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loraft.fastpaths import REGISTRY, apply_patch, fast_path, patches_on_load, supports_supervised_loss
from loraft.fastpaths.bloom import uses_fast_bloom
from loraft.loss import supervised_cross_entropy

VOCAB = 96
# tiny configs per registered architecture (2 layers, 32 wide, no dropout, so two forwards compare); a new
# registry entry needs one here
SHAPES = {
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def _model(model_type: str, seed: int = 0):
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **SHAPES[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 12), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a masked prompt
    return input_ids, mask, labels


def test_every_registered_architecture_has_a_test_shape():
    assert set(REGISTRY) == set(SHAPES)


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_supervised_loss_and_gradients_equal_the_models_own(model_type):
    model = _model(model_type).train()
    if fast_path(model).patch is not None:
        apply_patch(model)
    fused = copy.deepcopy(model)
    assert supports_supervised_loss(model)
    input_ids, mask, labels = _batch()
    count = int((labels[:, 1:] != -100).sum())
    expected = model(input_ids=input_ids, attention_mask=mask, labels=labels,
                     num_items_in_batch=torch.tensor(count)).loss
    expected.backward()
    body = fused.base_model
    hidden = body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    actual = supervised_cross_entropy(hidden, labels, fused.get_output_embeddings().weight, count)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), fused.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_sub_batches_sum_to_the_whole_batch(model_type):
    """The LoraftTrainer sub-batch rule (each part's loss summed over the whole step's count) on each family."""
    whole_model = _model(model_type).train()
    split_model = copy.deepcopy(whole_model)
    input_ids, mask, labels = _batch()
    count = torch.tensor(int((labels[:, 1:] != -100).sum()))
    whole = whole_model(input_ids=input_ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss
    whole.backward()
    total = 0.0
    for rows in ([0], [1, 2]):
        width = int(mask[rows].sum(dim=1).max())  # each sub-batch cut to its own longest row, as the trainer does
        part = split_model(input_ids=input_ids[rows, :width], attention_mask=mask[rows, :width],
                           labels=labels[rows, :width], num_items_in_batch=count).loss
        part.backward()
        total += part.item()
    assert total == pytest.approx(whole.item(), rel=1e-5)
    for (name, a), b in zip(whole_model.named_parameters(), split_model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_patches_apply_on_the_default_attention_only_and_the_log_names_them():
    assert patches_on_load("bloom", None) and patches_on_load("bloom", "sdpa")
    assert not patches_on_load("bloom", "eager") and not patches_on_load("llama", None)
    bloom = _model("bloom")
    assert not uses_fast_bloom(bloom) and apply_patch(bloom) == 2
    assert uses_fast_bloom(bloom)
    assert apply_patch(_model("llama")) == 0


def test_unregistered_or_head_with_bias_gets_no_fused_loss():
    model = _model("llama")
    model.config.model_type = "gemma"  # scales its logits: not registered
    assert fast_path(model) is None and not supports_supervised_loss(model)
    model = _model("llama")
    model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    assert not supports_supervised_loss(model)


def test_supervised_loss_supports_known_heads(tiny_bloom_dir, tiny_llama_dir):
    for path in (tiny_bloom_dir, tiny_llama_dir):
        assert supports_supervised_loss(AutoModelForCausalLM.from_pretrained(path))
