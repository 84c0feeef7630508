"""Generation with a run's template: batched == one by one, CLI generate and chat."""

import io
import json

import pytest
import torch

from loraft.cli import main
from loraft.config import GenerationConfig, load_config
from loraft.generate import chat, encode_prompt, generate_batch, generation_kwargs, load_run, stop_token_ids
from loraft.train import train

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def run_dir(tiny_bloom_dir, tmp_path_factory):
    from conftest import write_alpaca

    data = write_alpaca(tmp_path_factory.mktemp("gen-data") / "train.jsonl")
    out = tmp_path_factory.mktemp("gen-runs") / "run"
    # fp32 training and generation: the CLI's answers are compared with fp32 greedy generation, on any CPU
    train(load_config(None, [f"model.name_or_path={tiny_bloom_dir}", f"data.path={data}", f"output_dir={out}",
                             "train.max_steps=4", "train.learning_rate=0.01", "train.precision=fp32",
                             "generation.dtype=fp32"]))
    return out


def test_prompt_encoding_matches_training(run_dir):
    _, tokenizer, template, _ = load_run(run_dir)
    ids = encode_prompt(tokenizer, template, [{"role": "user", "content": "人工智能是什么\n"}])
    assert ids == tokenizer("Human: 人工智能是什么\n\nAssistant: ")["input_ids"]
    assert stop_token_ids(tokenizer, template) == [tokenizer.eos_token_id]


def test_batched_generation_equals_one_by_one(run_dir):
    model, tokenizer, template, _ = load_run(run_dir)
    prompts = [[{"role": "user", "content": text}] for text in ("你好", "请把下面的句子翻译成英文\n今天天气很好", "1 2 3")]
    together = generate_batch(model, tokenizer, template, prompts, GREEDY, batch_size=3)
    alone = [generate_batch(model, tokenizer, template, [p], GREEDY, batch_size=1)[0] for p in prompts]
    assert together == alone
    # and the same as transformers' own generate on the unpadded prompt
    ids = torch.tensor([encode_prompt(tokenizer, template, prompts[0])])
    reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True) == together[0]


def test_generate_cli_prompt_and_file(run_dir, tmp_path, capsys):
    assert main(["generate", str(run_dir), "--prompt", "你好", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    # the streamed pieces are the whole greedy answer, then one newline; nothing else goes to stdout
    model, tokenizer, template, _ = load_run(run_dir)
    settings = GREEDY.model_copy(update={"max_new_tokens": 5})
    answer = generate_batch(model, tokenizer, template, [[{"role": "user", "content": "你好"}]], settings)[0]
    assert answer
    assert capsys.readouterr().out == answer + "\n"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "你好"}\n{"instruction": "翻译", "input": "今天"}\n'
                       '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
                       encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    assert main(["generate", str(run_dir), "--input", str(prompts), "--output", str(output),
                 "--temperature", "0", "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r.get("prompt") or r.get("instruction") or "messages" for r in rows] == ["你好", "翻译", "messages"]
    assert all(isinstance(r["response"], str) for r in rows)
    # never overwrite the user's file
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--input", str(prompts), "--output", str(output)]) == 2
    assert capsys.readouterr().err == f"error: {output}: exists already; choose another --output\n"


def test_generate_file_errors(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    assert main(["generate", str(run_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    # the same reader and wording as training data
    assert capsys.readouterr().err == f"error: {bad}, line 2: not valid JSON: Expecting value (column 12)\n"
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "?"}\n', encoding="utf-8")
    assert main(["generate", str(run_dir), "--input", str(missing), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == (
        f"error: {missing}, line 1, field 'prompt': needs one of messages, instruction or prompt\n"
    )


def test_chat_keeps_history_and_resets(run_dir, monkeypatch):
    seen = []
    import loraft.generate as generate_module

    original = generate_module.stream_answer

    def recording(model, tokenizer, template, messages, settings):
        seen.append([dict(m) for m in messages])
        return original(model, tokenizer, template, messages, settings)

    monkeypatch.setattr(generate_module, "stream_answer", recording)
    stdout = io.StringIO()
    chat(run_dir, GREEDY, stdin=io.StringIO("你好\n再说一次\n/reset\n第三句\n/exit\n"), stdout=stdout)
    assert [len(m) for m in seen] == [1, 3, 1]
    assert seen[1][0]["content"] == "你好" and seen[1][1]["role"] == "assistant"
    assert "(history cleared)" in stdout.getvalue()


def test_not_a_run_dir(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: not a finished loraft run (no adapter_config.json)\n"


def test_min_new_tokens_holds_off_the_end_token(run_dir):
    model, tokenizer, template, _ = load_run(run_dir)
    ids = torch.tensor([encode_prompt(tokenizer, template, [{"role": "user", "content": "你好"}])])
    # make the end token the model's first choice, so that only min_new_tokens keeps it from stopping
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 1e4
    hook = model.base_model.model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        for floor, expected in ((0, 1), (10, 10)):
            kwargs = generation_kwargs(tokenizer, template, GREEDY.model_copy(update={"min_new_tokens": floor,
                                                                                    "max_new_tokens": 10}))
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            assert out.shape[1] - ids.shape[1] == expected
    finally:
        hook.remove()


def test_prompt_file_errors_name_the_line_and_field_before_any_model_loads(tmp_path, capsys):
    """A messages record whose turn lacks a role stops with one sentence, exit 2, before the run is opened."""
    from loraft.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "你好"}\n{"messages": [{"content": "你好"}]}\n', encoding="utf-8")
    code = main(["generate", str(tmp_path / "no-run"), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {prompts}, line 2, field 'messages': message 1 has unknown 'role' None "
        "(expected system, user or assistant)\n")


def test_prompt_file_keeps_a_line_separator_inside_a_string(tmp_path):
    from loraft.generate import read_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "第一行\u2028第二行"}\n', encoding="utf-8")
    [(record, messages)] = read_prompts(prompts)
    assert messages == [{"role": "user", "content": "第一行\u2028第二行"}]


def test_generation_settings_resolve_saved_then_cli_then_request():
    from loraft.config import GenerationConfig
    from loraft.generate import GenerationSettingError, cli_flag, resolve_generation

    saved = GenerationConfig(max_new_tokens=3, temperature=0.0, top_p=0.5, dtype="fp32")
    # a flag not given (None) keeps the saved value; a given one applies on top
    settings = resolve_generation(saved, {"max_new_tokens": None, "temperature": 0.9})
    assert (settings.max_new_tokens, settings.temperature, settings.top_p, settings.dtype) == (3, 0.9, 0.5, "fp32")
    # a GenerationConfig as overrides: only the fields it set
    assert resolve_generation(saved, GenerationConfig(top_k=5)).model_dump() == {**saved.model_dump(), "top_k": 5}
    # request on top of the CLI on top of saved
    cli = resolve_generation(saved, {"top_p": 0.8})
    assert resolve_generation(cli, {"max_new_tokens": 7}).model_dump() == {
        **saved.model_dump(), "top_p": 0.8, "max_new_tokens": 7}
    with pytest.raises(GenerationSettingError, match=r"^--top-p: must be less than or equal to 1 \(got 1.5\)$"):
        resolve_generation(saved, {"top_p": 1.5}, label=cli_flag)
    with pytest.raises(GenerationSettingError, match=r"^generation.max_new_tokens: must be greater than 0 \(got 0\)$"):
        resolve_generation(saved, {"max_new_tokens": 0})
    with pytest.raises(GenerationSettingError, match="^generation.beam: not a generation setting"):
        resolve_generation(saved, {"beam": 2})


def test_chat_and_generate_use_the_runs_saved_settings(tiny_bloom_dir, tmp_path_factory, capsys):
    from loraft.cli import main
    from run_helpers import trained_run

    run_dir = trained_run(tmp_path_factory, "bloom-saved-generation", tiny_bloom_dir,
                          ["generation.max_new_tokens=2", "generation.temperature=0"])
    capsys.readouterr()  # the training's own output
    assert main(["generate", str(run_dir), "--prompt", "你好"]) == 0
    short = capsys.readouterr().out.rstrip("\n")
    assert main(["generate", str(run_dir), "--prompt", "你好", "--max-new-tokens", "6"]) == 0
    longer = capsys.readouterr().out.rstrip("\n")
    # greedy from the saved temperature 0: the 6-token answer continues the saved 2-token one
    assert longer.startswith(short) and len(longer) > len(short)
    assert main(["generate", str(run_dir), "--prompt", "你好", "--temperature", "9"]) == 2
    assert capsys.readouterr().err == "error: --temperature: must be less than or equal to 2 (got 9.0)\n"


def test_a_checkpoint_or_the_base_alone_can_be_loaded_for_chat(tiny_bloom_dir, tmp_path, capsys):
    """What `--checkpoint` and `--base` load (chat, serve, the UI's chat beside the adapter): the named checkpoint's
    adapter, or the base model without any adapter; both with the run's tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import write_alpaca
    from loraft.cli import main
    from loraft.errors import RunError
    from loraft.generate import load_run
    from loraft.run_access import RunAccess, open_run
    from loraft.serve.start import served_model_id

    data = write_alpaca(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    train(load_config(None, [f"model.name_or_path={tiny_bloom_dir}", f"data.path={data}", f"output_dir={out}",
                             "train.max_steps=4", "train.save_steps=2", "train.learning_rate=0.05",
                             "train.precision=fp32"]))
    probe = torch.tensor([[5, 6, 7, 8]])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=probe).logits

    opened = open_run(out, RunAccess(checkpoint="checkpoint-2"))
    assert opened.adapter_dir == out / "checkpoints" / "checkpoint-2"
    final_model, tokenizer, template, _ = load_run(out, dtype="fp32")
    checkpoint_model, _, checkpoint_template, _ = load_run(opened, dtype="fp32")
    base_model, _, base_template, info = load_run(out, dtype="fp32", base_only=True)
    assert template.name == checkpoint_template.name == base_template.name and info["adapter_dir"] is None
    plain_base = AutoModelForCausalLM.from_pretrained(str(tiny_bloom_dir), dtype=torch.float32).eval()
    # loraft loads with its own attention path (fastpaths): equal up to float rounding
    assert torch.allclose(logits(base_model), logits(plain_base), atol=1e-5)
    assert not torch.allclose(logits(checkpoint_model), logits(final_model))
    assert not torch.allclose(logits(checkpoint_model), logits(plain_base))
    assert served_model_id(out, out) == "run"
    assert served_model_id(out, opened.adapter_dir) == "run/checkpoint-2"
    assert served_model_id(out, out, base_only=True) == "run/base"

    capsys.readouterr()
    with pytest.raises(RunError, match=r"no complete checkpoint checkpoint-3 \(checkpoints: checkpoint-2, "
                                       r"checkpoint-4\)"):
        open_run(out, RunAccess(checkpoint="checkpoint-3"))
    assert main(["chat", str(out), "--checkpoint", "../run"]) == 2
    assert capsys.readouterr().err == f"error: {out}: '../run' is not a checkpoint name (checkpoint-N)\n"
