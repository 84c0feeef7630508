import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from loraft.cli import main
from loraft.config import AdapterConfig
from loraft.errors import ModelError
from loraft.inspection import inspect_model
from loraft.model import attach_adapter, target_matches, tied_embedding_note


@pytest.fixture(scope="module")
def bloom_1b4_shape_dir(tmp_path_factory):
    """A config-only directory of the bloom-1b4-zh shape: no weights at all."""
    path = tmp_path_factory.mktemp("bloom-1b4-zh-config")
    BloomConfig(vocab_size=46145, hidden_size=2048, n_layer=24, n_head=16).save_pretrained(path)
    return path


def test_reference_regex_matches_h1_and_h10_to_h19(bloom_1b4_shape_dir):
    report = inspect_model(str(bloom_1b4_shape_dir))
    layers = sorted(int(name.split(".")[2]) for name in report["matched"])
    assert layers == [1] + list(range(10, 20))
    assert all(name.endswith("self_attention.query_key_value") for name in report["matched"])
    assert report["total_params"] == 1_303_111_680
    # 11 x r*(2048 + 3*2048) LoRA weights + the 46145 x 2048 word_embeddings copy
    assert report["trainable_params"] == 11 * 8 * (2048 + 6144) + 46145 * 2048


def test_inspect_cli_json(bloom_1b4_shape_dir, capsys):
    assert main(["inspect", str(bloom_1b4_shape_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"matched", "trainable_params", "total_params"}
    assert len(report["matched"]) == 11 and report["total_params"] == 1_303_111_680


def test_pattern_matching_nothing_is_one_sentence(bloom_1b4_shape_dir, capsys):
    assert main(["inspect", str(bloom_1b4_shape_dir), "--target", r".*\.q_proj"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        r"error: adapter.target_modules '.*\\.q_proj' matches no module of the model; module names look like: "
        "transformer.h.0.self_attention.query_key_value, transformer.h.0.self_attention.dense, "
        "transformer.h.0.mlp.dense_h_to_4h, transformer.h.0.mlp.dense_4h_to_h\n"
    )


def test_list_targets_use_peft_suffix_rules(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    matched = target_matches(model, AdapterConfig(target_modules=["q_proj", "v_proj"], modules_to_save=None))
    assert matched == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_unknown_modules_to_save_is_an_error(tiny_bloom_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    with pytest.raises(ModelError, match=r"^adapter.modules_to_save: 'embed_tokens' matches no module"):
        attach_adapter(model, AdapterConfig(modules_to_save=["embed_tokens"]))


def test_tied_embedding_is_detected_and_split_like_the_reference(tiny_bloom_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    note = tied_embedding_note(model, AdapterConfig())
    assert note["trained"] == "transformer.word_embeddings" and note["frozen"] == "lm_head"
    peft_model, info = attach_adapter(model, AdapterConfig())
    wrapper = peft_model.base_model.model.transformer.word_embeddings
    # lm_head keeps the frozen base weight; the trained copy serves the input side only
    assert peft_model.base_model.model.lm_head.weight is wrapper.original_module.weight
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not peft_model.base_model.model.lm_head.weight.requires_grad
    assert info["tied_embeddings"] == note
    untied = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    assert tied_embedding_note(untied, AdapterConfig(modules_to_save=None)) is None


@pytest.mark.parametrize(
    "adapter",
    [
        AdapterConfig(),
        AdapterConfig(target_modules=["query_key_value", "dense"], modules_to_save=None, use_rslora=True),
        AdapterConfig(target_modules=["query_key_value"], modules_to_save=None, use_dora=True),
        AdapterConfig(method="ia3", target_modules=["query_key_value", "dense_4h_to_h"],
                      feedforward_modules=["dense_4h_to_h"], modules_to_save=None),
        AdapterConfig(method="prompt_tuning", num_virtual_tokens=4, modules_to_save=None),
        AdapterConfig(method="prefix_tuning", num_virtual_tokens=4, modules_to_save=None),
    ],
    ids=["lora-reference", "lora-rslora", "dora", "ia3", "prompt-tuning", "prefix-tuning"],
)
def test_every_method_attaches_and_trains_only_adapter_weights(tiny_bloom_dir, adapter):
    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    peft_model, _ = attach_adapter(model, adapter)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert not any(".h.0.self_attention.query_key_value.weight" in name and "lora" not in name for name in trainable)
    ids = torch.tensor([[5, 6, 7, 8]])
    output = peft_model(input_ids=ids, labels=ids)
    output.loss.backward()
    assert all(p.grad is not None for _, p in peft_model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("fixture", ["tiny_bloom_dir", "tiny_llama_dir"])
def test_half_precision_load_equals_from_pretrained_dtype(fixture, request):
    from loraft.config import ModelConfig
    from loraft.model import load_base_model

    path = request.getfixturevalue(fixture)
    ours = load_base_model(ModelConfig(name_or_path=str(path)), torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for name, tensor in theirs_state.items():
        assert ours_state[name].dtype == tensor.dtype, name
        assert torch.equal(ours_state[name], tensor), name
    assert any(t.dtype == torch.bfloat16 for t in ours_state.values())
    # tied weights stay one tensor
    assert (ours.get_input_embeddings().weight is ours.get_output_embeddings().weight) == (
        theirs.get_input_embeddings().weight is theirs.get_output_embeddings().weight)


def test_detach_from_checkpoint_copies_mapped_weights_and_keeps_the_function(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from loraft.weights import detach_from_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    copied = detach_from_checkpoint(model)
    assert copied > 0  # from_pretrained memory-maps the safetensors file
    assert detach_from_checkpoint(model) == 0  # nothing maps it any more
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, before)
