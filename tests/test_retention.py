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
