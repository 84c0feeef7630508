import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraft.cli import main
from loraft.export import merge_run, vllm_adapter_problems
from loraft.model import load_run_model
from loraft.run_access import open_run
from loraft.templates import get_template
from run_helpers import trained_run

PROMPTS = ["Human: 人工智能是什么\n\nAssistant: 人工智能是计算机科学的一个分支。", "请计算 12 加 30 等于多少 ABC"]


@pytest.fixture(scope="module")
def bloom_run(tmp_path_factory, tiny_bloom_dir):
    """Reference adapter: LoRA on .*\\.1.*query_key_value plus a trained copy of the tied word_embeddings."""
    return trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama_dir):
    """A plain LoRA adapter (no modules_to_save): what vLLM can load as it is."""
    return trained_run(tmp_path_factory, "llama-lora", tiny_llama_dir,
                       ["adapter.target_modules=[q_proj, v_proj]", "adapter.modules_to_save=null"])


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def bloom_merged(bloom_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "bloom"
    assert main(["merge", str(bloom_run), "--out", str(out)]) == 0
    return out


def test_tied_embedding_merge_reloads_with_equal_logits(bloom_run, bloom_merged, tiny_bloom_dir):
    peft_model, tokenizer = load_run_model(open_run(bloom_run))
    wrapper = peft_model.base_model.model.transformer.word_embeddings
    trained_copy = wrapper.modules_to_save["default"].weight
    base_embedding = wrapper.original_module.weight
    # The case peft issue #2777 is about: the trained input embedding really differs from lm_head's weight.
    assert (trained_copy - base_embedding).abs().max() > 1e-3
    assert peft_model.base_model.model.lm_head.weight is base_embedding
    assert all(p.abs().max() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)

    merged = AutoModelForCausalLM.from_pretrained(bloom_merged, dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings is False
    assert merged.lm_head.weight is not merged.transformer.word_embeddings.weight
    torch.testing.assert_close(merged.transformer.word_embeddings.weight, trained_copy, rtol=0, atol=0)
    torch.testing.assert_close(merged.lm_head.weight, base_embedding, rtol=0, atol=0)
    torch.testing.assert_close(_logits(merged, tokenizer), _logits(peft_model, tokenizer), rtol=0, atol=1e-4)


def test_retying_the_merged_embedding_would_change_the_function(bloom_run, bloom_merged, tmp_path):
    """The check above can fail. A checkpoint written with the tie left on (peft #2777) holds no lm_head
    weight and says tie_word_embeddings=true; its reload binds lm_head to the trained input embedding."""
    from safetensors.torch import load_file, save_file

    peft_model, tokenizer = load_run_model(open_run(bloom_run))
    naive = tmp_path / "naive"
    shutil.copytree(bloom_merged, naive)
    config = json.loads((naive / "config.json").read_text(encoding="utf-8"))
    (naive / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}), encoding="utf-8")
    weights = load_file(naive / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, naive / "model.safetensors", metadata={"format": "pt"})
    retied = AutoModelForCausalLM.from_pretrained(naive, dtype=torch.float32).eval()
    assert retied.lm_head.weight is retied.transformer.word_embeddings.weight
    assert (_logits(retied, tokenizer) - _logits(peft_model, tokenizer)).abs().max() > 1e-2


def test_merged_dir_carries_tokenizer_template_and_stop_token(bloom_merged):
    tokenizer = AutoTokenizer.from_pretrained(bloom_merged)
    template = get_template("human_assistant")
    messages = [{"role": "user", "content": "人工智能是什么"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == template.render_text(
        messages, tokenizer.eos_token, add_generation_prompt=True
    )
    model = AutoModelForCausalLM.from_pretrained(bloom_merged)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    record = json.loads((bloom_merged / "loraft_merge.json").read_text(encoding="utf-8"))
    assert record["dtype"] == "fp32" and record["untied_embeddings"]["tie_word_embeddings"] is False
    assert sorted(p.name for p in bloom_merged.glob("*.safetensors")) == ["model.safetensors"]


def test_bf16_sharded_merge_of_an_untied_llama(llama_run, tmp_path):
    out = tmp_path / "llama-bf16"
    assert main(["merge", str(llama_run), "--out", str(out), "--dtype", "bf16", "--max-shard-size", "20KB"]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and merged.config.tie_word_embeddings is False
    peft_model, tokenizer = load_run_model(open_run(llama_run))
    reference = _logits(peft_model, tokenizer)
    torch.testing.assert_close(_logits(merged, tokenizer).float(), reference, rtol=0, atol=0.05)

    fp32 = tmp_path / "llama-fp32"
    merge_run(llama_run, fp32)
    reloaded = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, tokenizer), reference, rtol=0, atol=1e-4)


def test_merge_refuses_a_non_empty_out_dir_unless_asked(bloom_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "model-00001-of-00009.safetensors").write_text("stale shard", encoding="utf-8")
    assert main(["merge", str(bloom_run), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: exists and is not empty; choose another --out or pass --overwrite\n"
    assert main(["merge", str(bloom_run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"  # the user's file stays
    assert not (out / "model-00001-of-00009.safetensors").exists()  # an earlier export's shard does not
    assert (out / "model.safetensors").is_file()


def test_merge_bad_inputs(bloom_run, tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: run directory not found\n"
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: not a finished loraft run (no adapter_config.json)\n"
    assert main(["merge", str(bloom_run), "--out", str(bloom_run)]) == 2
    assert capsys.readouterr().err == f"error: {bloom_run}: --out must not be the run directory itself\n"
    (tmp_path / "file").write_text("x", encoding="utf-8")
    assert main(["merge", str(bloom_run), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file'}: exists and is not a directory\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(bloom_run), "--out", str(tmp_path / "o"), "--dtype", "int8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_prompt_tuning_run_cannot_be_merged(bloom_run, tmp_path, capsys):
    run = tmp_path / "prompt-run"
    shutil.copytree(bloom_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    config = (run / "config.yaml").read_text(encoding="utf-8").replace("method: lora", "method: prompt_tuning")
    (run / "config.yaml").write_text(config, encoding="utf-8")
    assert main(["merge", str(run), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}: a prompt_tuning adapter adds virtual tokens and cannot be merged into the weights; "
        "serve the run directory with loraft serve instead\n"
    )


# --- what vLLM's LoRA loader reads ---------------------------------------------------------------------
# vLLM (vllm/lora/peft_helper.py, lora_model.py) reads adapter_config.json (r, lora_alpha, target_modules
# required; modules_to_save must be empty; no DoRA; bias "none"; r <= --max-lora-rank, 16 by default) and
# the tensors of adapter_model.safetensors, whose names must parse as <module>.lora_A/.lora_B weights.


def test_plain_lora_run_dir_is_what_vllm_loads(llama_run):
    from safetensors import safe_open

    assert (llama_run / "adapter_config.json").is_file() and (llama_run / "adapter_model.safetensors").is_file()
    assert not any((llama_run / name).exists() for name in ("adapter_model.bin", "adapter_model.pt",
                                                            "new_embeddings.safetensors", "new_embeddings.bin"))
    adapter = json.loads((llama_run / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8 and adapter["lora_alpha"] == 8
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert not adapter["modules_to_save"] and adapter["use_dora"] is False and adapter["bias"] == "none"
    with safe_open(str(llama_run / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    expected = {}
    for layer in range(2):
        for module, out_features in (("q_proj", 32), ("v_proj", 16)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            expected[f"{prefix}.lora_A.weight"] = (8, 32)
            expected[f"{prefix}.lora_B.weight"] = (out_features, 8)
    assert shapes == expected
    assert vllm_adapter_problems(llama_run) == []


def test_modules_to_save_adapter_is_flagged_for_merge(bloom_run):
    assert vllm_adapter_problems(bloom_run) == [
        "modules_to_save is ['word_embeddings']; vLLM only loads adapters without it (serve a `loraft merge` "
        "output instead)",
        "adapter_model.safetensors holds non-LoRA tensors: base_model.model.transformer.word_embeddings.weight",
    ]
    assert "r is 8; start vLLM with --max-lora-rank 8 or more" in vllm_adapter_problems(bloom_run, max_lora_rank=4)


def test_the_reference_answers_a_prompt_asked_again_without_another_forward(bloom_merged):
    """An adapter-only export's negative control asks the merged model for the same prompts again: the reference
    keeps each answer, so its forward runs once a prompt, and a prompt asked again gets the same numbers."""
    from loraft.export.verify import Reference

    reference = Reference.load(bloom_merged)
    forwards = []
    reference.model.register_forward_hook(lambda module, args, output: forwards.append(args))
    first = reference.top_logprobs([5, 6, 7])
    assert reference.top_logprobs([5, 6, 7]) == first and len(forwards) == 1
    assert reference.top_logprobs([5, 6, 8]) != first and len(forwards) == 2
    assert reference.top_logprobs([5, 6, 7], k=2) == first[:2] and len(forwards) == 3
