"""Every registered family trains with the settings users get: autotune on (its measurement kept short),
`train.micro_batch_tokens: auto`, precision auto, on a tiny random model whose special token ids lie past any
vocabulary the measurement reduces to (issue 25: a pad id of 512 or more stopped the default path)."""

import json
import math
import re

import pytest
import torch
from transformers import (BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config, TrainerCallback)

from loraft import tune
from loraft.config import load_config
from loraft.fastpaths import REGISTRY
from loraft.train import train
from conftest import _train_tokenizer, save_random_model, write_alpaca

VOCAB = 1600  # the models' vocabulary: past the 512 tokens of the measurement's one-layer model
FIRST_SPECIAL = 1500  # where the tokenizer's BOS, EOS and pad start (Llama 3 keeps its specials at 128000+)
LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def _ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


# model_type -> (a tiny random config of the family from the tokenizer, the LoRA targets named as its modules are).
# Every special id is >= FIRST_SPECIAL; the variations are the ones real configs ship.
FAMILIES = {
    # several EOS ids, as Llama 3.1's config lists them; pad, bos and eos all past 512
    "llama": (lambda tok: LlamaConfig(vocab_size=VOCAB, **SMALL, **{**_ids(tok), "eos_token_id": [
        tok.eos_token_id, FIRST_SPECIAL - 1]}), LLAMA_STYLE),
    "mistral": (lambda tok: MistralConfig(vocab_size=VOCAB, **SMALL, **_ids(tok)), LLAMA_STYLE),
    # pad = eos, as many fine-tunes set it
    "qwen2": (lambda tok: Qwen2Config(vocab_size=VOCAB, **SMALL, **{**_ids(tok), "pad_token_id": tok.eos_token_id},
                                      tie_word_embeddings=True), LLAMA_STYLE),
    "qwen3": (lambda tok: Qwen3Config(vocab_size=VOCAB, **SMALL, head_dim=8, **_ids(tok)), LLAMA_STYLE),
    # Phi-3: bos 1, eos = pad = 32000 of a 32064 vocabulary, scaled down
    "phi3": (lambda tok: Phi3Config(vocab_size=VOCAB, **SMALL, **{**_ids(tok), "bos_token_id": 1,
                                                                  "pad_token_id": tok.eos_token_id}),
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "gpt2": (lambda tok: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **_ids(tok)),
             ["c_attn", "c_proj", "c_fc"]),
    "gpt_neox": (lambda tok: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=128, **_ids(tok)), FUSED_QKV),
    "bloom": (lambda tok: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **_ids(tok)), FUSED_QKV),
}


@pytest.fixture(scope="module")
def tokenizer_with_high_specials():
    """The test tokenizer with reserved tokens up to FIRST_SPECIAL, then its own BOS (prepended), EOS and pad."""
    from tokenizers import processors

    tokenizer = _train_tokenizer(add_bos=True)
    tokenizer.add_tokens([f"<|reserved_{index}|>" for index in range(len(tokenizer), FIRST_SPECIAL)],
                         special_tokens=True)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                  "pad_token": "<|finetune_pad|>"})
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
    assert FIRST_SPECIAL <= min(_ids(tokenizer).values()) and len(tokenizer) < VOCAB
    return tokenizer


class Snapshot(TrainerCallback):
    """The trainable parameters before and after training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_every_registered_family_has_a_tiny_model_here():
    assert sorted(FAMILIES) == sorted(REGISTRY), "a family registered in loraft.fastpaths needs an entry in FAMILIES"


def test_the_embedding_check_builds_a_model_whose_special_ids_are_past_its_vocabulary():
    """The tuning key asks whether the adapter trains the input embedding by building the architecture at an
    8-token vocabulary (any modules_to_save, the default included, gets there before the measurement)."""
    config = load_config(None, ["adapter.modules_to_save=[embed_tokens]"])
    model_config = LlamaConfig(vocab_size=VOCAB, **SMALL, bos_token_id=FIRST_SPECIAL, pad_token_id=FIRST_SPECIAL + 1,
                               eos_token_id=[FIRST_SPECIAL + 2, 2])
    assert tune.trains_input_embedding(config, model_config)
    assert (model_config.pad_token_id, model_config.eos_token_id) == (FIRST_SPECIAL + 1, [FIRST_SPECIAL + 2, 2])


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_family_trains_with_the_default_autotune(family, tokenizer_with_high_specials, tmp_path, monkeypatch):
    if family not in FAMILIES:
        pytest.fail(f"no tiny {family} model in tests/test_families.py FAMILIES")
    make_config, targets = FAMILIES[family]
    monkeypatch.setenv("LORAFT_AUTOTUNE", "1")  # the session's default is 0: this test is the users' default
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))  # an empty tuning cache: this run must measure
    # the measurement adds no round of candidates past its budget (the first always runs): short on any machine
    monkeypatch.setattr(tune, "BUDGET_SECONDS", 0.5)
    base = save_random_model(tmp_path / family, tokenizer_with_high_specials, make_config(tokenizer_with_high_specials))
    config = load_config(None, [
        f"model.name_or_path={base}", f"data.path={write_alpaca(tmp_path / 'alpaca.jsonl')}",
        f"output_dir={tmp_path / 'run'}", "data.template=human_assistant", "data.max_length=64",
        f"adapter.target_modules=[{','.join(targets)}]", "adapter.modules_to_save=null",
        "train.max_steps=3", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
        "train.logging_steps=1",
    ])
    assert (config.train.autotune, config.train.micro_batch_tokens, config.train.precision) == (True, "auto", "auto")
    snapshot = Snapshot()

    run_dir = train(config, callbacks=[snapshot], progress_bar=False)

    record = json.loads((run_dir / "loraft_run.json").read_text(encoding="utf-8"))
    assert (record["status"], record["global_step"]) == ("finished", 3)
    assert math.isfinite(record["train_loss"])
    assert snapshot.before and all("lora_" in name for name in snapshot.before)
    for name, before in snapshot.before.items():
        assert not torch.equal(before, snapshot.after[name]), f"trainable {name} did not change"
    # the autotune measured this model's shape in this run, and the plan took its choices
    tuning = record["plan"]["tuning"]
    assert tuning["key"]["shape"]["model_type"] == family and tuning["key"]["shape"]["vocab_size"] == VOCAB
    assert "library/0" in tuning["layouts"]  # the reference's path, always the first candidate timed
    measured = "measured fastest of the candidates on this machine (loraft.tune)"
    assert record["plan"]["reasons"]["micro_batch_tokens"] == measured
    assert list((tmp_path / "home" / "tuning").glob("tune-*.json"))
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert re.search(r"^ +measured +in [0-9.]+ s at the model's width", log, re.M)
