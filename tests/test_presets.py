"""The per-family presets: what each trains (`loraft inspect --preset`, offline on the shipped shapes), and that
each one runs as shipped on a tiny model of its architecture with only the model, data and length overridden."""

from __future__ import annotations

import json

import pytest

from loraft.cli import main
from loraft.config import load_config
from loraft.presets import preset_names, preset_path, shipped_shape

FAMILY_PRESETS = ["llama3-qlora", "mistral-qlora", "qwen2-lora", "qwen2-qlora"]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _expected_lora_parameters(shape: dict, r: int) -> int:
    """r x (in + out) for every targeted linear layer, from the published shape alone."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = (hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inner) * 2 + (inner + hidden)
    return r * per_layer * shape["num_hidden_layers"]


def test_every_family_preset_ships_its_shape():
    assert set(FAMILY_PRESETS) <= set(preset_names())
    for name in FAMILY_PRESETS:
        config = load_config(preset_path(name))
        assert shipped_shape(config.model.name_or_path) is not None, name
        assert config.data.template == "model" and config.adapter.target_modules == LINEAR


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_inspect_preset_offline_lists_what_it_trains(name, capsys):
    config = load_config(preset_path(name))
    shape = json.loads((shipped_shape(config.model.name_or_path) / "config.json").read_text())
    assert main(["inspect", "--preset", name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["matched"]) == len(LINEAR) * shape["num_hidden_layers"]
    assert {m.rsplit(".", 1)[1] for m in report["matched"]} == set(LINEAR)
    assert report["trainable_params"] == _expected_lora_parameters(shape, config.adapter.r)
    assert main(["inspect", "--preset", name]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"model: {config.model.name_or_path} (shape shipped with loraft; no weights read) — preset {name}")


def test_inspect_preset_on_a_local_model_and_errors(tiny_qwen2_dir, capsys):
    assert main(["inspect", str(tiny_qwen2_dir), "--preset", "qwen2-lora", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["matched"]) == len(LINEAR) * 2
    assert main(["inspect"]) == 2
    assert capsys.readouterr().err == "error: inspect: give a model (name or directory) or --preset NAME\n"
    assert main(["inspect", "--preset", "nope"]) == 2
    assert capsys.readouterr().err == f"error: unknown preset 'nope' (presets: {', '.join(preset_names())})\n"


def _tiny_llama3_64(path):
    """A Llama-3-style model 64 wide: bitsandbytes' CPU 4-bit kernels pack inputs in blocks of 64."""
    from conftest import llama3_tokenizer, save_random_model
    from transformers import LlamaConfig

    tokenizer = llama3_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return save_random_model(path, tokenizer, config)


@pytest.mark.parametrize("name", ["qwen2-lora", "llama3-qlora"])
def test_family_preset_trains_as_shipped_on_a_tiny_model(name, request, tmp_path, alpaca_jsonl):
    if load_config(preset_path(name)).model.quantization != "none":
        pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
        model = _tiny_llama3_64(tmp_path / "base")
    else:
        model = request.getfixturevalue("tiny_qwen2_dir")
    run = tmp_path / "run"
    assert main(["train", name, f"model.name_or_path={model}", f"data.path={alpaca_jsonl}",
                 f"output_dir={run}", "data.max_length=64", "train.max_steps=2", "train.logging_steps=1"]) == 0
    assert json.loads((run / "loraft_run.json").read_text())["status"] == "finished"
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(LINEAR)
    record = json.loads((run / "loraft_run.json").read_text())
    assert record["template"] == "model" and len(record["target_matches"]) == len(LINEAR) * 2
