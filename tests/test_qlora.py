"""QLoRA (model.quantization) on tiny Llama- and Qwen2-architecture models, on the CPU: the loss goes down, the
adapter is plain peft on the unquantized base, and merge gives a standalone model within a stated bound of the adapter
on the quantized base. (A missing bitsandbytes is tested in test_weights.py, which runs without it.)"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")

from conftest import _train_tokenizer, save_random_model, write_alpaca  # noqa: E402

from loraft.config import load_config  # noqa: E402

# bitsandbytes' CPU 4-bit kernels pack weights in blocks of 64 inputs: the tiny models are 64 wide.
WIDTH = 64
# The merged model is the adapter on the unquantized base; against the adapter on the NF4 base its logits differ
# by the quantization error. Measured on these tiny models after 24 steps: 0.145 (llama) and 0.177 (qwen2), the
# largest absolute logit difference over 2 x 24 positions; the bound leaves some margin.
MERGE_BOUND = 0.25


def _tiny(tmp_path_factory, family: str):
    from transformers import LlamaConfig, Qwen2Config

    tokenizer = _train_tokenizer(add_bos=family == "llama")
    shape = dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id) if family == "llama" else Qwen2Config(**shape)
    return save_random_model(tmp_path_factory.mktemp(f"tiny-{family}-{WIDTH}"), tokenizer, config)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def qlora_run(request, tmp_path_factory):
    from loraft.train import train

    base = _tiny(tmp_path_factory, request.param)
    root = tmp_path_factory.mktemp(f"qlora-{request.param}")
    data = write_alpaca(root / "train.jsonl")
    config = load_config(None, [
        f"model.name_or_path={base}", f"data.path={data}", f"output_dir={root / 'run'}", "model.quantization=nf4",
        "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "adapter.modules_to_save=null", "adapter.r=8", "adapter.alpha=16", "train.max_steps=24",
        "train.learning_rate=0.01", "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
        "train.logging_steps=1", "train.precision=fp32",
    ])
    return base, train(config)


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_qlora_trains_on_a_4bit_base_and_the_loss_goes_down(qlora_run):
    from loraft.model import load_run_model
    from loraft.run_access import open_run

    _, run_dir = qlora_run
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.95 * sum(losses[:4]) / 4  # measured: 5.89 -> 5.20 (llama)
    run = open_run(run_dir)
    model, _ = load_run_model(run)
    assert run.config.model.quantization == "nf4"
    assert type(model.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"


def test_generate_answers_on_the_quantized_base(qlora_run, capsys):
    from loraft.cli import main

    _, run_dir = qlora_run
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "你好", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_the_adapter_is_plain_peft_and_merge_is_within_the_quantization_error(qlora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraft.export import merge_run
    from loraft.model import load_run_model
    from loraft.run_access import open_run

    base_dir, run_dir = qlora_run
    input_ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      run_dir).eval()
    on_quantized, _ = load_run_model(open_run(run_dir))
    merged = AutoModelForCausalLM.from_pretrained(merge_run(run_dir, tmp_path / "merged"), dtype=torch.float32).eval()
    exact = _logits(plain, input_ids)
    torch.testing.assert_close(_logits(merged, input_ids), exact, rtol=1e-5, atol=1e-5)
    quantization_error = (_logits(on_quantized, input_ids) - _logits(merged, input_ids)).abs().max().item()
    assert 0 < quantization_error < MERGE_BOUND
    # the adapter trained: it changes the function of the unquantized base too
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert (_logits(base, input_ids) - exact).abs().max().item() > 10 * 1e-5


def test_int8_loads_and_trains_one_step(tmp_path_factory, tmp_path, alpaca_jsonl):
    from loraft.train import train

    base = _tiny(tmp_path_factory, "llama")
    run = train(load_config(None, [f"model.name_or_path={base}", f"data.path={alpaca_jsonl}", f"output_dir={tmp_path / 'r'}",
                                   "model.quantization=int8", "adapter.target_modules=[q_proj,v_proj]",
                                   "adapter.modules_to_save=null", "train.max_steps=1", "train.precision=fp32"]))
    assert json.loads((run / "loraft_run.json").read_text())["status"] == "finished"


def _serving_tolerance(logits: torch.Tensor) -> float:
    """How far a 4-bit model's logits may move with the batch around them. On a CPU with AVX512-BF16, bitsandbytes'
    inference kernel computes the 4-bit layers in bf16 whatever dtype was asked for (Linear4bit.forward packs the
    weights for it in eval mode), and its rounding depends on the batch's rows: one bf16 step at the logits' scale
    (measured on a Zen 4: 5.2e-4 apart, on logits of this size). Elsewhere the layers compute in fp32: 1e-5."""
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        return torch.finfo(torch.bfloat16).eps * float(logits.abs().max())
    return 1e-5


def test_two_qlora_runs_mix_in_one_batch_and_answer_as_each_alone(qlora_run, tmp_path):
    """`loraft serve` of two QLoRA runs on one 4-bit base: a mixed batch (peft's 4-bit LoRA layers take peft's own
    mixed path) gives each run's first-token logits and greedy answers as that run loaded alone."""
    from loraft.generate import encode_prompt, load_run
    from loraft.run_access import RunAccess, open_run
    from loraft.serve import ServeSettings, create_app
    from loraft.serve.adapters import load_runs
    from loraft.train import train
    from test_serve_adapters import alone_answer, in_one_batch

    base, first = qlora_run
    second = train(load_config(None, [
        f"model.name_or_path={base}", f"data.path={write_alpaca(tmp_path / 'train.jsonl')}",
        f"output_dir={tmp_path / 'second'}", "model.quantization=nf4", "adapter.target_modules=[q_proj,v_proj]",
        "adapter.modules_to_save=null", "train.max_steps=4", "train.learning_rate=0.03",
        "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1", "train.precision=fp32"]))
    runs = [first, second]
    engine, _ = load_runs([open_run(run, RunAccess()) for run in runs], ["first", "second"], device="cpu",
                          dtype="fp32")
    captured = []
    engine.batcher.first_logits = lambda jobs, logits: captured.append(([j.adapter for j in jobs], logits.clone()))
    prompts = ["人工智能是什么", "北京", "你好", "写一首诗"]
    requests = [(["first", "second"][i % 2], prompt, 6) for i, prompt in enumerate(prompts)]
    responses = in_one_batch(engine, create_app(engine, ServeSettings(max_tokens_cap=16)), requests)
    alone = {"first": load_run(first, dtype="fp32"), "second": load_run(second, dtype="fp32")}
    assert len(captured) == 1 and len(set(captured[0][0])) == 2  # one prefill, both adapters in it
    for row, ((name, prompt, tokens), response) in enumerate(zip(requests, responses)):
        assert response.json()["choices"][0]["message"]["content"] == alone_answer(alone, name, prompt, tokens).text
        model, tokenizer, template, _ = alone[name]
        ids = torch.tensor([encode_prompt(tokenizer, template, [{"role": "user", "content": prompt}])])
        expected = _logits(model, ids)[0, -1]
        torch.testing.assert_close(captured[0][1][row], expected, rtol=0, atol=_serving_tolerance(expected))
    engine.close()
