"""The fast paths compute the reference's function: SDPA-alibi attention, the supervised-only loss,
bf16-stored frozen weights, micro-batch regrouping and length grouping. No timings here (see benchmarks/)."""

import copy
import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from loraft.fastpaths import supports_supervised_loss
from loraft.fastpaths.bloom import BLOOM_ATTENTION_PARAMETERS, use_fast_bloom, uses_fast_bloom
from loraft.batching import LengthGroupedSampler, plan_micro_batches, sample_lengths, split_by_tokens
from loraft.loss import supervised_cross_entropy


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


# ---------------------------------------------------------------------------------------------- attention


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


# ---------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("count", [None, 37])
def test_supervised_loss_equals_standard_loss(count):
    model = _bloom().train()
    fast = copy.deepcopy(model)
    input_ids, mask, labels = _batch()
    kwargs = {"num_items_in_batch": torch.tensor(count)} if count else {}
    expected = model(input_ids=input_ids, attention_mask=mask, labels=labels, **kwargs).loss
    expected.backward()
    hidden = fast.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state
    actual = supervised_cross_entropy(hidden, labels, fast.lm_head.weight, count)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_supervised_loss_chunks_and_trainable_head(monkeypatch):
    """Many small chunks, and a head whose weight is trained, give the same loss and gradients."""
    import loraft.loss

    monkeypatch.setattr(loraft.loss, "CHUNK_ELEMENTS", 120 * 3)  # 3 rows per chunk
    hidden = torch.randn(3, 14, 64, requires_grad=True)
    weight = torch.randn(120, 64, requires_grad=True)
    _, _, labels = _batch()
    logits = hidden @ weight.T
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 120), labels[:, 1:].reshape(-1))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    actual = supervised_cross_entropy(hidden, labels, weight)
    actual_grads = torch.autograd.grad(actual, (hidden, weight))
    torch.testing.assert_close(actual, expected)
    for a, b in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_supervised_loss_without_supervised_tokens_is_zero_and_differentiable():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    loss = supervised_cross_entropy(hidden, torch.full((2, 5), -100), torch.randn(10, 8))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None


def test_supervised_loss_supports_known_heads(tiny_bloom_dir, tiny_llama_dir):
    for path in (tiny_bloom_dir, tiny_llama_dir):
        assert supports_supervised_loss(AutoModelForCausalLM.from_pretrained(path))


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    "batch, accumulation, budget, expected",
    [(1, 8, 1024, (8, 1)), (4, 16, 2048, (64, 1)), (1, 8, 0, (1, 8)), (8, 1, 512, (8, 1))],
)
def test_plan_micro_batches_keeps_the_optimizer_step(batch, accumulation, budget, expected):
    micro, steps = plan_micro_batches(batch, accumulation, budget)
    assert (micro, steps) == expected
    assert micro * steps == batch * accumulation


@pytest.mark.parametrize("budget", [1, 100, 256, 1024, 4096])
def test_split_by_tokens_covers_every_row_once_within_the_budget(budget):
    lengths = torch.randint(1, 300, (37,), generator=torch.Generator().manual_seed(budget)).tolist()
    groups = split_by_tokens(lengths, budget)
    assert sorted(row for group in groups for row in group) == list(range(37))
    for group in groups:
        longest = max(lengths[row] for row in group)
        assert len(group) == 1 or len(group) * longest <= budget
        assert longest == lengths[group[0]]


def test_length_grouped_sampler_is_a_permutation_of_similar_length_batches():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 256, (200,), generator=generator).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    batches = [order[i : i + 8] for i in range(0, 200, 8)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    random_padded = sum(max(lengths[i] for i in order_b) * len(order_b)
                        for order_b in (list(range(200))[i : i + 8] for i in range(0, 200, 8)))
    assert padded < 0.8 * random_padded
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the largest micro-batch first
    assert list(LengthGroupedSampler(lengths, 8, seed=42)) == order  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_sample_lengths_reads_the_length_column_or_input_ids():
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]]})
    assert sample_lengths(data) == [3, 1, 2]
    assert sample_lengths(data.select([2, 0])) == [2, 3]
    assert sample_lengths(data.add_column("length", [30, 10, 20])) == [30, 10, 20]


# ---------------------------------------------------------------------------------------------- whole runs


def _run(model_dir, data_dir, out_dir, *overrides):
    import json

    from loraft.config import load_config
    from loraft.train import train

    config = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.path={data_dir}", f"output_dir={out_dir}",
        "train.max_steps=4", "train.logging_steps=1", "train.learning_rate=0.01", "train.save_steps=1000",
        "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=8", *overrides,
    ])
    train(config)
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


REFERENCE_PATH = ["train.precision=fp32", "train.sampling=random", "train.micro_batch_tokens=0",
                  "train.supervised_loss=false", "model.attn_implementation=eager", "train.optim=adamw_torch"]


@pytest.mark.parametrize("options", [["train.micro_batch_tokens=2048"], ["train.micro_batch_tokens=40"],
                                     ["train.gradient_checkpointing=true"]], ids=["one-batch", "split", "checkpointing"])
def test_fast_path_in_fp32_gives_the_reference_losses(tiny_bloom_dir, alpaca_disk_dir, tmp_path, monkeypatch, options):
    """Parity mode: the step's 8 samples as one batch (or split into sub-batches of <= 40 tokens, or with
    activations recomputed), SDPA-alibi, supervised-only loss == batch 1 x accumulation 8, eager, full logits,
    step for step."""
    monkeypatch.setenv("LORAFT_CACHE_DIR", str(tmp_path / "cache"))
    reference = _run(tiny_bloom_dir, alpaca_disk_dir, tmp_path / "reference", *REFERENCE_PATH)
    fast = _run(tiny_bloom_dir, alpaca_disk_dir, tmp_path / "fast", "train.precision=fp32", "train.sampling=random",
                *options)
    assert len(reference) == len(fast) == 4
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=0)


def test_default_fast_path_trains_close_to_the_reference(tiny_bloom_dir, alpaca_disk_dir, tmp_path, monkeypatch):
    """bf16 where the CPU has it, reference order: the same samples per step, losses within 2%."""
    monkeypatch.setenv("LORAFT_CACHE_DIR", str(tmp_path / "cache"))
    reference = _run(tiny_bloom_dir, alpaca_disk_dir, tmp_path / "reference", *REFERENCE_PATH)
    fast = _run(tiny_bloom_dir, alpaca_disk_dir, tmp_path / "fast", "train.sampling=random")
    grouped = _run(tiny_bloom_dir, alpaca_disk_dir, tmp_path / "grouped")
    torch.testing.assert_close(fast, reference, rtol=0.02, atol=0)
    assert all(torch.isfinite(torch.tensor(grouped))) and grouped[-1] < grouped[0]


# ---------------------------------------------------------------------------------------------- bf16 weights


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
