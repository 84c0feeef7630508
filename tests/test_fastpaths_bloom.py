"""loraft.fastpaths.bloom: the SDPA-alibi attention and tanh GELU that replace BLOOM's eager ones compute the same
function (forward, gradients, cached generation), and loading applies them unless eager is asked for."""

import copy
import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from loraft.fastpaths.bloom import BLOOM_ATTENTION_PARAMETERS, use_fast_bloom, uses_fast_bloom


def _bloom(layers=2, hidden=64, heads=4, vocab=120, seed=0):
    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads)
    return AutoModelForCausalLM.from_config(config).eval()


def _batch(vocab=120, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (3, 14), generator=generator)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a prompt
    return input_ids, mask, labels


def test_bloom_attention_signature_is_the_one_replaced():
    """If transformers changes BloomAttention.forward, the SDPA replacement must be revisited."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    assert tuple(inspect.signature(BloomAttention.forward).parameters) == BLOOM_ATTENTION_PARAMETERS


def test_bloom_gelu_is_the_tanh_approximation():
    """BloomGelu (forward and its hand-written backward) equals F.gelu(approximate="tanh") that replaces it."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    assert tuple(inspect.signature(BloomGelu.forward).parameters) == ("self", "x")
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    expected = BloomGelu()(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    actual = torch.nn.functional.gelu(x, approximate="tanh")
    (actual_grad,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-7, atol=1e-8)


def test_loading_bloom_applies_the_fast_paths_unless_eager(tiny_bloom_dir):
    from loraft.config import ModelConfig
    from loraft.model import load_base_model

    for attention in (None, "sdpa"):
        assert uses_fast_bloom(load_base_model(ModelConfig(name_or_path=str(tiny_bloom_dir),
                                                           attn_implementation=attention)))
    assert not uses_fast_bloom(load_base_model(ModelConfig(name_or_path=str(tiny_bloom_dir),
                                                           attn_implementation="eager")))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sdpa_alibi_equals_eager(padding_side):
    eager = _bloom()
    sdpa = copy.deepcopy(eager)
    assert use_fast_bloom(sdpa) == 2 and uses_fast_bloom(sdpa) and not uses_fast_bloom(eager)
    input_ids, mask, _ = _batch()
    if padding_side == "left":
        mask = mask.flip(-1)
    with torch.no_grad():
        expected = eager(input_ids=input_ids, attention_mask=mask).logits
        actual = sdpa(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_sdpa_alibi_gradients_equal_eager():
    eager = _bloom().train()
    sdpa = copy.deepcopy(eager)
    use_fast_bloom(sdpa)
    input_ids, mask, labels = _batch()
    eager(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    sdpa(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, a), b in zip(eager.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_alibi_generation_with_cache_equals_eager():
    eager = _bloom()
    sdpa = copy.deepcopy(eager)
    use_fast_bloom(sdpa)
    input_ids, mask, _ = _batch()
    mask = mask.flip(-1)  # generation pads on the left
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(eager.generate(input_ids, **kwargs), sdpa.generate(input_ids, **kwargs))


def test_sdpa_alibi_in_bf16_is_closer_to_fp32_than_eager():
    """Relative alibi keeps the bias exact near the diagonal; eager rounds slope * position in bf16."""
    model = _bloom(hidden=128, heads=8)
    sdpa = copy.deepcopy(model)
    use_fast_bloom(sdpa)
    input_ids = torch.randint(4, 120, (2, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager_bf16 = model(input_ids=input_ids).logits.float()
            sdpa_bf16 = sdpa(input_ids=input_ids).logits.float()
    assert (sdpa_bf16 - reference).abs().mean() <= (eager_bf16 - reference).abs().mean()
