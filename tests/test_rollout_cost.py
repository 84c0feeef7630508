"""GRPO's estimated step (loraft.rollout_cost): generation against the update, timed at the model's width on one
layer and scaled by its shape; the plan and train.log show it, cached per machine and shape, skipped without
autotune. The arithmetic is checked with a fixed clock (no test depends on how fast this machine is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraft import rollout_cost
from loraft.config import load_config
from loraft.plan import make_plan, read_model_config
from loraft.precision import Capabilities

EMULATED = Capabilities("cpu", "override", cpu_bf16_flags=False, bf16_speedup=0.01)


@pytest.fixture(autouse=True)
def fresh_tuning_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))


def _config(model: Path, *overrides: str):
    return load_config(None, [f"model.name_or_path={model}", "data.path=p.jsonl", "train.objective=grpo",
                              "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2",
                              "grpo.num_generations=4", "grpo.max_completion_length=6", "data.max_length=64",
                              "grpo.rewards=[{type: number, field: answer}]",
                              "adapter.target_modules=[q_proj, v_proj]", "adapter.modules_to_save=null", *overrides])


def test_the_estimate_adds_its_parts_by_the_models_shape(tiny_llama_dir, monkeypatch):
    """With every timing 1 s, each part is its count: layers x (prefill, L decoding steps, update; a decoding step is
    one of the DECODE_STEPS timed together), the head and sampling once a new token and the head's update once,
    scaled to the vocabulary; a reference forward only with beta > 0."""
    monkeypatch.setattr(rollout_cost, "timed", lambda work, **kwargs: 1.0)
    config = _config(tiny_llama_dir)
    model_config = read_model_config(config)[0]
    layers, vocab = model_config.num_hidden_layers, model_config.vocab_size
    scale = vocab / min(vocab, rollout_cost.VOCAB_SLICE)
    result = rollout_cost.measure(config, "fp32", model_config, log=lambda line: None)
    assert result["prompt_tokens"] == 16 and result["prompt_source"] == "assumed: data.max_length / 4"
    decoding = layers * 6 / rollout_cost.DECODE_STEPS
    assert result["parts"] == {"prefill": layers, "decoding": decoding, "head and sampling": round(scale * 6, 4),
                               "forward and backward": layers, "head forward and backward": round(scale, 4)}
    assert result["generation_s"] == round(layers + decoding + scale * 6, 4)
    assert result["update_s"] == round(layers + scale, 4)
    assert rollout_cost.cached(config, "fp32", model_config) == result
    assert rollout_cost.cached(config, "fp32", model_config, 20) is None  # the data's 20 tokens: not this estimate

    with_reference = rollout_cost.measure(_config(tiny_llama_dir, "grpo.beta=0.04"), "fp32", model_config,
                                          prompt_tokens=20, log=lambda line: None)
    assert with_reference["parts"]["reference forward"] == layers
    assert with_reference["prompt_source"] == "the data's mean"
    generation, update = layers + decoding + scale * 6, 2 * layers + scale
    assert with_reference["update_s"] == round(update, 4)
    assert rollout_cost.describe(with_reference).startswith(
        f"~{generation:.2f} s generating + ~{update:.2f} s updating a step (generation "
        f"{generation / (generation + update):.0%}); prompts of 20 tokens (the data's mean)")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_measurement_runs_on_a_tiny_model(tiny_llama_dir, precision):
    """Both branches of the plan's precision measure (bf16 frozen weights under autocast, as a bf16 plan trains),
    and a target pattern that names no module of the first layer times the layer without LoRA."""
    config = _config(tiny_llama_dir)
    model_config = read_model_config(config)[0]
    result = rollout_cost.measure(config, precision, model_config, prompt_tokens=9, log=lambda line: None)
    assert result["generation_s"] > 0 and result["update_s"] > 0 and result["key"]["precision"] == precision
    deeper = _config(tiny_llama_dir, r"adapter.target_modules=.*\.1\..*q_proj")
    assert rollout_cost.measure(deeper, precision, model_config, log=lambda line: None)["update_s"] > 0


def test_the_plan_shows_the_estimate_or_why_there_is_none(tiny_llama_dir):
    config = _config(tiny_llama_dir)
    model_config = read_model_config(config)[0]
    estimate = rollout_cost.measure(config, "fp32", model_config, log=lambda line: None)
    plan = make_plan(config, EMULATED, model_config, rollout_cost=estimate)
    assert f"rollout cost        {rollout_cost.describe(estimate)}" in plan.describe()
    assert plan.rollout_cost == estimate and type(plan).from_dict(plan.to_dict()) == plan
    unmeasured = make_plan(config, EMULATED, model_config)
    assert "rollout cost        not measured  (autotune off, several processes, or not measured yet" in \
        unmeasured.describe()
    sft = make_plan(_config(tiny_llama_dir, "train.objective=sft"), EMULATED, model_config)
    assert "rollout" not in sft.describe()


def test_a_grpo_run_estimates_with_its_prompts_mean_length(tiny_llama_dir, tmp_path, monkeypatch):
    """With autotune on, a GRPO run times its step once, at its prompts' mean length: train.log and the run record's
    plan carry it."""
    from loraft.train import train

    monkeypatch.setenv("LORAFT_AUTOTUNE", "1")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"请计算 {i} 加 {i}", "answer": 2 * i}, ensure_ascii=False)
                            + "\n" for i in range(8)), encoding="utf-8")
    config = _config(tiny_llama_dir, f"data.path={data}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                     "train.precision=fp32")
    run = Path(train(config, progress_bar=False))
    record = json.loads((run / "loraft_run.json").read_text())
    report = json.loads((run / "data_report.json").read_text())
    estimate = record["plan"]["rollout_cost"]
    assert estimate["prompt_source"] == "the data's mean"
    assert estimate["prompt_tokens"] == round(report["tokens"]["prompt"] / report["samples_kept"])
    assert f"rollout cost: {rollout_cost.describe(estimate)}" in (run / "train.log").read_text()
    # timed once, at the data's length: not first at an assumed one the data then replaces
    assert len(list((tmp_path / "home" / "tuning").glob("rollout-*.json"))) == 1
