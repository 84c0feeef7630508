"""Retention (loraft.retention): general accuracy of base and run, and the KL per token from the base, on the
project's general prompts; invariants on a tiny trained run."""

from __future__ import annotations

import json

import pytest
import torch

import loraft.retention as retention
from loraft.cli import main
from run_helpers import trained_run


@pytest.fixture(scope="module")
def bloom_run(tmp_path_factory, tiny_bloom_dir):
    return trained_run(tmp_path_factory, "retention", tiny_bloom_dir)


def _loaded(run_dir):
    from loraft.generate import cli_flag, load_run, resolve_generation

    model, tokenizer, template, info = load_run(run_dir)
    settings = resolve_generation(info["config"].generation, {"temperature": 0.0, "max_new_tokens": 6}, label=cli_flag)
    return model, tokenizer, template, info, settings


def test_a_trained_adapter_moves_the_model_and_an_identity_adapter_does_not(bloom_run, monkeypatch):
    model, tokenizer, template, info, settings = _loaded(bloom_run)
    calls = []
    generate = retention.generate_answers
    monkeypatch.setattr(retention, "generate_answers", lambda *a, **k: calls.append(1) or generate(*a, **k))
    trained = retention.measure_retention(model, tokenizer, template, info["config"], settings, info["dtype"],
                                          batch_size=8, limit=16)
    assert (trained["prompts"], trained["max_new_tokens"]) == (16, 6)
    assert trained["checkable"] == sum(bool(p["answers"]) for p in retention.load_prompts()[:16])
    assert trained["kl_per_token"] > 1e-4  # 4 steps at lr 1e-2 changed the next-token distributions
    assert len(calls) == 2  # the base's answers, then the run's

    # the adapter made the identity (LoRA B zero, the trained embedding copy back to the base's): nothing moved
    from peft.utils import ModulesToSaveWrapper

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.modules_to_save["default"].load_state_dict(module.original_module.state_dict())
    calls.clear()
    same = retention.measure_retention(model, tokenizer, template, info["config"], settings, info["dtype"],
                                       batch_size=8, limit=16)
    assert len(calls) == 1  # the base's answers came from the cache
    assert same["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert same["accuracy"] == same["base_accuracy"] == trained["base_accuracy"]
    assert [s["run"] for s in same["samples"]] == [s["base"] for s in same["samples"]]


def _naive_kl(model, tokenizer, template, prompts, answers) -> float:
    """The definition, one row at a time: every position's logits, the answer's positions summed."""
    from loraft.generate import encode_prompt

    total, count = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            prefix = encode_prompt(tokenizer, template, [{"role": "user", "content": prompt["prompt"]}])
            if not answer["ids"]:
                continue
            ids = torch.tensor([prefix + answer["ids"]])
            run = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            with model.disable_adapter():
                base = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            span = slice(len(prefix) - 1, ids.shape[1] - 1)
            total += float((base[span].exp() * (base[span] - run[span])).sum())
            count += ids.shape[1] - len(prefix)
    return total / count


def test_the_kl_is_the_definitions_and_several_adapters_share_one_base_forward(bloom_run, monkeypatch):
    """Batched by length with the logits of the answer positions only (or all of them, for a model whose forward
    has no logits_to_keep), the KL is the one-row-at-a-time definition's; measured for two adapters at once, each
    gets what it gets alone, the base's forward runs once a batch, and the active adapter is restored."""
    model, tokenizer, template, info, settings = _loaded(bloom_run)
    prompts = retention.load_prompts()[:12]
    cache = retention._cache_file(info["config"], template, prompts, 6, "fp32")
    answers = retention.base_answers(model, tokenizer, template, prompts, settings, 4, cache)
    expected = _naive_kl(model, tokenizer, template, prompts, answers)
    assert expected > 1e-4
    assert retention.kl_per_token(model, tokenizer, template, prompts, answers, 5) == pytest.approx(expected, rel=1e-4)
    with monkeypatch.context() as patch:
        patch.setattr(retention, "takes_logits_to_keep", lambda model: False)
        assert retention.kl_per_token(model, tokenizer, template, prompts, answers, 5) == pytest.approx(expected,
                                                                                                        rel=1e-4)
    model.load_adapter(str(bloom_run), adapter_name="identity")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and ".identity." in name:
                parameter.zero_()
        from peft.utils import ModulesToSaveWrapper

        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper) and "identity" in module.modules_to_save:
                module.modules_to_save["identity"].load_state_dict(module.original_module.state_dict())
    forwards = []
    model.get_base_model().register_forward_pre_hook(lambda module, args: forwards.append(1))
    both = retention.kl_per_token(model, tokenizer, template, prompts, answers, 6, adapters=["default", "identity"])
    assert len(forwards) == 2 * 3  # two batches: the base once and each adapter once
    assert both["default"] == pytest.approx(expected, rel=1e-4) and both["identity"] == pytest.approx(0.0, abs=1e-6)
    assert model.active_adapter == "default"
    results = retention.measure_retention(model, tokenizer, template, info["config"], settings, info["dtype"],
                                          batch_size=6, limit=12, adapters=["default", "identity"])
    assert results["default"]["kl_per_token"] == pytest.approx(expected, rel=1e-3)
    assert results["identity"]["accuracy"] == results["identity"]["base_accuracy"]
    assert [s["run"] for s in results["identity"]["samples"]] == [s["base"] for s in results["identity"]["samples"]]


def test_eval_reports_retention_with_or_without_held_out_data(bloom_run, capsys):
    assert main(["eval", str(bloom_run), "--retention-limit", "12", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("retention on 12 general prompts") and "KL from the base" in out
    metrics = json.loads((bloom_run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["retention"]["prompts"] == 12 and set(metrics["retention"]["by_language"]) <= {"en", "zh"}
    assert main(["eval", str(bloom_run), "--no-retention"]) == 2
    assert capsys.readouterr().err == "error: nothing to evaluate: give --data FILE, or leave retention on\n"


def test_the_prompt_set_is_answered_by_the_base_once_per_base_template_and_length(bloom_run, tmp_path):
    model, tokenizer, template, info, settings = _loaded(bloom_run)
    prompts = retention.load_prompts()[:4]
    first = retention._cache_file(info["config"], template, prompts, 6, "fp32")
    assert first == retention._cache_file(info["config"], template, prompts, 6, "fp32")
    assert first != retention._cache_file(info["config"], template, prompts, 7, "fp32")
    assert first != retention._cache_file(info["config"], template, retention.load_prompts()[:5], 6, "fp32")
