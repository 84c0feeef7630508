"""The retention guard (loraft.retention_guard): a KL term to the base on shipped general conversations, on by
default for SFT, off in the recipe's preset; each invariant on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from loraft.config import load_config
from loraft.errors import ConfigError
from loraft.generate import encode_prompt
from loraft.presets import preset_path
from loraft.retention_guard import GUARD_MAX_TOKENS, RetentionGuard, encode_guard_texts, resolved
from loraft.retention_check import load_guard_texts
from loraft.templates import get_template


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("template", ["human_assistant", "chatml"])
def test_the_scored_positions_predict_exactly_the_reply_and_its_end(tiny_bloom_dir, template):
    tokenizer = _tokenizer(tiny_bloom_dir)
    chosen = get_template(template, tokenizer)
    rows = encode_guard_texts(tokenizer, chosen, max_length=4096)
    texts = load_guard_texts()
    assert len(rows) == len(texts)
    for (ids, first), text in zip(rows[:20], texts[:20]):
        reply = tokenizer.decode(ids[first + 1:], skip_special_tokens=True).strip()
        if len(ids) < GUARD_MAX_TOKENS:
            # the tokens after `first` are the reply, then the template's end of turn
            assert reply.startswith(text["response"]) and len(reply) - len(text["response"]) <= len("<|im_end|>")
        else:  # cut at GUARD_MAX_TOKENS: the reply's beginning
            assert len(reply) > 10 and text["response"].startswith(reply)
        # everything up to `first` is the prompt as generation encodes it (the assistant header last)
        assert ids[:first + 1] == encode_prompt(tokenizer, chosen, [{"role": "user", "content": text["prompt"]}])


def test_a_short_max_length_cuts_rows_and_skips_those_without_a_reply(tiny_bloom_dir):
    tokenizer = _tokenizer(tiny_bloom_dir)
    rows = encode_guard_texts(tokenizer, get_template("human_assistant", tokenizer), max_length=40)
    assert rows and all(len(ids) <= 40 and 1 <= first < len(ids) - 1 for ids, first in rows)
    assert len(rows) < len(load_guard_texts())


def test_the_rotation_is_seeded_and_covers_every_text_before_repeating():
    rows = [([1, 2, 3, i + 4], 1) for i in range(10)]
    guard = RetentionGuard(rows, weight=1.0, rows_per_step=3, pad_id=0, seed=7)
    again = RetentionGuard(rows, weight=1.0, rows_per_step=3, pad_id=0, seed=7)
    seen = [tuple(guard.batch(step, "cpu")["input_ids"][:, 3].tolist()) for step in range(4)]
    assert seen == [tuple(again.batch(step, "cpu")["input_ids"][:, 3].tolist()) for step in range(4)]
    first_ten = [token for step in seen for token in step][:10]
    assert sorted(first_ten) == list(range(4, 14))
    batch = guard.batch(0, "cpu")
    assert batch["scored"].sum(dim=1).tolist() == [2, 2, 2]  # positions 1 and 2 predict tokens 2 and 3


def test_the_kl_is_zero_at_the_adapter_s_start_and_its_gradient_pulls_back_to_the_base(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(tiny_llama_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    rows = encode_guard_texts(tokenizer, get_template("chatml", tokenizer), max_length=128)
    guard = RetentionGuard(rows, weight=1.0, rows_per_step=2, pad_id=tokenizer.pad_token_id or 0, seed=0)
    import contextlib

    assert float(guard.kl(model, 0, contextlib.nullcontext)) == pytest.approx(0.0, abs=1e-6)  # B = 0: the base
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    moved = guard.kl(model, 0, contextlib.nullcontext)
    assert float(moved) > 1e-3
    moved.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)  # the base untouched
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 0.05 * parameter.grad
    assert float(guard.kl(model, 0, contextlib.nullcontext)) < float(moved)


def _perturbed_llama(path, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model


def _full_kl(model, guard, step):
    """KL(base || run) over the whole vocabulary, the adapter switched off for the base."""
    batch = guard.batch(step, "cpu")
    with torch.no_grad():
        run = guard._log_probs(model, batch)
        with model.disable_adapter():
            base = guard._log_probs(model, batch)
    return float((base.exp() * (base - run)).sum(-1).mean())


def test_the_top_k_kl_never_exceeds_the_full_kl_and_equals_it_with_the_whole_vocabulary(tiny_llama_dir, monkeypatch):
    import contextlib

    import loraft.retention_guard as guard_module

    tokenizer = _tokenizer(tiny_llama_dir)
    model = _perturbed_llama(tiny_llama_dir)
    rows = encode_guard_texts(tokenizer, get_template("chatml", tokenizer), max_length=128)
    coarse = RetentionGuard(rows, weight=1.0, rows_per_step=3, pad_id=0, seed=0)
    full = [_full_kl(model, coarse, step) for step in range(3)]
    topk = [float(coarse.kl(model, step, contextlib.nullcontext)) for step in range(3)]
    assert all(0 < k <= f + 1e-6 for k, f in zip(topk, full))
    monkeypatch.setattr(guard_module, "TOP_K", model.config.vocab_size)
    whole = RetentionGuard(rows, weight=1.0, rows_per_step=3, pad_id=0, seed=0)
    assert [float(whole.kl(model, step, contextlib.nullcontext)) for step in range(3)] == pytest.approx(full, rel=1e-4)


def test_the_base_targets_are_computed_once_for_the_rows_a_run_scores_and_then_read_from_the_cache(
        tiny_llama_dir, tmp_path, monkeypatch):
    import contextlib

    tokenizer = _tokenizer(tiny_llama_dir)
    model = _perturbed_llama(tiny_llama_dir)
    rows = encode_guard_texts(tokenizer, get_template("chatml", tokenizer), max_length=128)[:20]
    cache = tmp_path / "targets.safetensors"
    first = RetentionGuard(rows, weight=1.0, rows_per_step=2, pad_id=0, seed=0, cache=cache)
    first.kl(model, 0, contextlib.nullcontext, last_step=2)  # a 3-step run: its 6 rows, not all 20
    assert sorted(first.targets) == sorted(first.rows_of_steps(range(3))) and len(first.targets) == 6
    assert cache.is_file()
    calls = []
    real_log_probs = RetentionGuard._log_probs
    monkeypatch.setattr(RetentionGuard, "_log_probs", staticmethod(lambda *a: calls.append(1) or real_log_probs(*a)))
    second = RetentionGuard(rows, weight=1.0, rows_per_step=2, pad_id=0, seed=0, cache=cache)
    second.prepare(model, contextlib.nullcontext, range(3))
    assert not calls  # all read from the cache
    assert sorted(second.targets) == sorted(first.targets)
    assert all(torch.equal(first.targets[i][0], second.targets[i][0]) and
               torch.equal(first.targets[i][1], second.targets[i][1]) for i in first.targets)
    second.prepare(model, contextlib.nullcontext)  # every row: only the 14 missing ones are computed, then cached
    assert len(calls) == 7 and len(second.targets) == 20
    calls.clear()
    third = RetentionGuard(rows, weight=1.0, rows_per_step=2, pad_id=0, seed=0, cache=cache)
    third.prepare(model, contextlib.nullcontext)
    assert not calls and len(third.targets) == 20
    cache.write_bytes(b"not a tensor file")  # a damaged cache is computed again, not trusted
    fourth = RetentionGuard(rows, weight=1.0, rows_per_step=2, pad_id=0, seed=0, cache=cache)
    fourth.prepare(model, contextlib.nullcontext)
    assert len(calls) == 10 and all(torch.equal(third.targets[i][1], fourth.targets[i][1]) for i in range(20))


def test_the_base_side_has_the_run_side_s_shapes_so_a_zero_adapter_scores_zero_in_bf16(tiny_llama_dir):
    import contextlib

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(tiny_llama_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    rows = encode_guard_texts(tokenizer, get_template("chatml", tokenizer), max_length=128)
    guard = RetentionGuard(rows, weight=1.0, rows_per_step=2, pad_id=0, seed=0)
    assert [float(guard.kl(model, step, contextlib.nullcontext, last_step=3)) for step in range(4)] == [0.0] * 4


def test_auto_is_the_guard_for_sft_and_off_for_preference_prompt_learning_and_the_recipe():
    assert resolved(load_config(None)) == "kl"
    assert resolved(load_config(preset_path("bloom-1b4-zh-lora"))) == "off"
    assert resolved(load_config(None, ["train.objective=dpo"])) == "off"
    assert resolved(load_config(None, ["adapter.method=prompt_tuning", "adapter.target_modules=null",
                                       "adapter.modules_to_save=null"])) == "off"
    assert resolved(load_config(None, ["model.quantization=nf4"])) == "off"
    assert load_config(None, ["train.retention=off"]).train.retention == "off"  # YAML's bare `off` is a boolean


@pytest.mark.parametrize("overrides, words", [
    (["train.retention=kl", "train.objective=dpo"], "train.objective=dpo keeps its own reference"),
    (["train.retention=kl", "adapter.method=prefix_tuning", "adapter.target_modules=null",
      "adapter.modules_to_save=null"], "needs a LoRA-family adapter"),
    (["train.retention=kl", "model.quantization=nf4"], "does not run on a quantized base yet"),
    (["train.retention=maybe"], "train.retention"),
])
def test_a_guard_that_cannot_apply_is_one_sentence(overrides, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert words in str(error.value) and "\n" not in str(error.value).strip()


def _run(tmp_path, model_dir, name, overrides=()):
    from conftest import write_alpaca
    from loraft.train import train

    data = write_alpaca(tmp_path / "alpaca.jsonl")
    config = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.path={data}", f"output_dir={tmp_path / name}",
        "train.max_steps=3", "train.learning_rate=0.01", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=2", "train.logging_steps=1", "train.save_steps=1000",
        "train.precision=fp32", "train.sampling=random", *overrides])
    return train(config, progress_bar=False)


def test_the_guard_changes_the_update_logs_its_kl_and_the_plan_names_it(tmp_path, tiny_bloom_dir):
    from safetensors.torch import load_file

    guarded = _run(tmp_path, tiny_bloom_dir, "guarded", ["train.retention_every=1"])
    plain = _run(tmp_path, tiny_bloom_dir, "plain", ["train.retention=off"])
    metrics = [json.loads(line) for line in (guarded / "metrics.jsonl").read_text().splitlines()]
    kls = [m["retention_kl"] for m in metrics if "retention_kl" in m]
    assert len(kls) == 3 and kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0  # B = 0 at step 0
    assert all("retention_kl" not in m for m in
               (json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()))
    a, b = load_file(guarded / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    record = json.loads((guarded / "loraft_run.json").read_text())
    assert record["plan"]["retention"].startswith("KL to the base")
    assert json.loads((plain / "loraft_run.json").read_text())["plan"]["retention"] == "off"


def test_auto_spaces_the_guard_so_its_tokens_stay_within_a_tenth_of_the_tasks():
    rows = [([1] * 80, 40), ([1] * 82, 40)]  # 81 tokens a row on average, 2 a guarded step: 162
    guard = RetentionGuard(rows, weight=0.3, rows_per_step=2, pad_id=0, seed=0)
    assert guard.tokens_per_step == 162
    for task_tokens, every in ((16 * 55, 2), (1620, 1), (1619, 2), (810, 2), (809, 3), (405, 4)):
        line = guard.set_every("auto", task_tokens)
        assert guard.every == every and 162 / task_tokens / every <= 0.1 + 1e-9, (task_tokens, line)
    guard.set_every("auto", 100)  # 17 would keep a tenth, but a guarded step comes at least every 4
    assert guard.every == 4
    assert guard.set_every(3, 100000).startswith("retention guard: every 3 optimizer step(s), weight 0.3 x 3")
    assert [s for s in range(10) if guard.guarded(s)] == [0, 3, 6, 9]


def test_a_guard_every_n_steps_is_the_guard_with_n_times_the_weight_on_those_steps(tmp_path, tiny_bloom_dir):
    from safetensors.torch import load_file

    spaced = _run(tmp_path, tiny_bloom_dir, "spaced", ["train.retention_every=2", "train.retention_weight=0.5"])
    assert "retention guard: every 2 optimizer step(s), weight 0.5 x 2" in (spaced / "train.log").read_text()
    logged = [(m["step"], "retention_kl" in m) for m in map(json.loads, (spaced / "metrics.jsonl").read_text().splitlines())
              if "loss" in m]
    assert logged == [(1, True), (2, False), (3, True)]  # guarded steps 0 and 2 (logged after them)
    one = _run(tmp_path, tiny_bloom_dir, "one", ["train.retention_every=2", "train.retention_weight=0.5",
                                                 "train.max_steps=1"])
    doubled = _run(tmp_path, tiny_bloom_dir, "doubled", ["train.retention_every=1", "train.retention_weight=1.0",
                                                         "train.max_steps=1"])
    a, b = load_file(one / "adapter_model.safetensors"), load_file(doubled / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="train.retention_every"):
        load_config(None, ["train.retention_every=0"])
