"""loraft.fastpaths.dropout: LoRA dropout's CPU masks keep nn.Dropout's distribution, its gradient and its place in
the model, and come from torch's generator (a resumed run restores them: the lifecycle and crash-safety resumes run
with adapter dropout 0.1, conftest.reference_yaml)."""

import math

import pytest
import torch
from torch import nn

from loraft.config import load_config
from loraft.fastpaths.dropout import WORDS, LoraDropout, drop_mask, drop_threshold, use_fast_dropout
from loraft.objective_table import objective
from loraft.plan import FAST_DROPOUT, choose_lora_dropout


def _sigmas(observed: float, p: float, n: int) -> float:
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_element_is_dropped_with_probability_p_and_kept_ones_are_scaled_to_keep_the_mean(p):
    torch.manual_seed(0)
    n = 1 << 20
    exact = drop_threshold(p) / WORDS
    assert abs(exact - p) <= 2 ** -17
    out = LoraDropout(p).train()(torch.ones(n))
    dropped = out == 0
    assert _sigmas(dropped.float().mean().item(), exact, n) < 5
    assert torch.equal(out[~dropped], torch.full_like(out[~dropped], 1 / (1 - exact)))
    # every 16-bit slot of a 64-bit word drops at p (a draw whose top bit is always 0 would never drop slot 3)
    for slot in range(4):
        share = dropped[slot::4].float().mean().item()
        assert _sigmas(share, exact, n // 4) < 5, (slot, share)


def test_elements_and_calls_are_independent():
    torch.manual_seed(1)
    p, n = 0.25, 1 << 20
    first, second = drop_mask((n,), p), drop_mask((n,), p)
    exact = drop_threshold(p) / WORDS
    # neighbours (same word and across words) and two calls: both dropped at p^2, as independent draws are
    for a, b in [(first[:-1], first[1:]), (first[:-4], first[4:]), (first, second)]:
        both = (a & b).float().mean().item()
        assert _sigmas(both, exact ** 2, a.numel()) < 5
    assert not torch.equal(first, second)


def test_the_generator_state_reproduces_the_masks():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = drop_mask((7, 33), 0.1)
    torch.set_rng_state(state)
    assert torch.equal(drop_mask((7, 33), 0.1), first)
    torch.manual_seed(3)
    assert torch.equal(drop_mask((7, 33), 0.1), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_the_same_mask_and_scale(dtype):
    torch.manual_seed(4)
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    dropout = LoraDropout(0.2).train()
    out = dropout(x)
    scale = WORDS / (WORDS - drop_threshold(0.2))
    kept = out != 0
    expected = torch.where(kept, x.detach() * scale, torch.zeros_like(x))
    assert out.dtype == dtype and torch.equal(out, expected)
    upstream = torch.randn_like(x)
    out.backward(upstream)
    assert torch.equal(x.grad, torch.where(kept, upstream * scale, torch.zeros_like(upstream)))


def test_eval_mode_and_p_zero_are_the_identity_and_it_is_an_nn_dropout():
    x = torch.randn(4, 8)
    assert torch.equal(LoraDropout(0.3).eval()(x), x)
    assert torch.equal(LoraDropout(0.0).train()(x), x)
    assert isinstance(LoraDropout(0.3), nn.Dropout) and LoraDropout(0.3).p == 0.3


def test_only_the_lora_dropouts_are_replaced_and_the_adapter_saves_as_peft_does(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft_dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    model.eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    before = model(input_ids=ids).logits
    replaced = use_fast_dropout(model)
    assert replaced == 2 * base.config.num_hidden_layers
    assert sum(isinstance(m, LoraDropout) for m in model.modules()) == replaced
    assert len([m for m in model.modules() if type(m) is nn.Dropout]) == len(peft_dropouts) - replaced
    assert torch.equal(model(input_ids=ids).logits, before)  # eval: dropout off, the same model
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, before)


@pytest.mark.parametrize("overrides, device, expected", [
    (["adapter.dropout=0.05"], "cpu", FAST_DROPOUT),
    (["adapter.dropout=0.05"], "cuda", "torch's"),
    ([], "cpu", "none"),
    (["adapter.dropout=0.05", "train.objective=dpo"], "cpu", "none"),
    (["adapter.dropout=0.05", "adapter.method=prompt_tuning"], "cpu", "none"),
])
def test_the_plan_uses_the_masks_where_peft_would_run_nn_dropout_on_the_cpu(overrides, device, expected):
    config = load_config(None, overrides)
    choice, reason = choose_lora_dropout(config, device, objective(config.train.objective))
    assert choice == expected and reason
