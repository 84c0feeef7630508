"""train.objective=grpo (loraft.objectives.grpo, loraft.prompts, loraft.rewards) on a tiny random Llama: the
prompts are loraft's, the rewards guarded, a reward rises, a bad reward or record is one sentence, and a run killed
mid-training resumes to the uninterrupted run's adapter bit for bit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_thread
from loraft.cli import main
from loraft.config import load_config
from loraft.errors import ConfigError, DataError
from loraft.rewards import (RECORD_COLUMN, GuardedReward, RewardError, exact_match, last_number, length_penalty,
                            number_match, regex_match)

HOOK = Path(__file__).parent / "kill_hook"


def digit_share(completions, **columns):
    """A graded reward a random model can climb: the share of digits in the completion (the test's function)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def raises_on_three(completions, answer, **columns):
    if 6 in answer:
        raise ValueError("no sixes here")
    return [0.0] * len(completions)


def write_prompts(path: Path, count: int = 16) -> Path:
    lines = [json.dumps({"instruction": f"请计算 {i} 加 {i}", "answer": 2 * i}, ensure_ascii=False) for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def grpo_yaml(model: Path, data: Path, run_dir: Path, rewards: str, steps: int = 3, save_steps: int = 100,
              extra: str = "") -> Path:
    path = run_dir.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""output_dir: {run_dir}
model: {{name_or_path: {model}}}
data: {{path: {data}, max_length: 64}}
adapter: {{target_modules: [q_proj, v_proj], modules_to_save: null, r: 8}}
train: {{objective: grpo, max_steps: {steps}, save_steps: {save_steps}, save_total_limit: null, logging_steps: 1,
  learning_rate: 0.02, per_device_train_batch_size: 4, gradient_accumulation_steps: 2, precision: fp32}}
grpo: {{num_generations: 4, max_completion_length: 10, rewards: {rewards}}}
{extra}""", encoding="utf-8")
    return path


@pytest.fixture()
def in_tests_dir(monkeypatch):
    """The test module importable as a reward function's module (`test_grpo:digit_share`)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, sentence", [
    (["train.objective=grpo"], "train.objective=grpo needs at least one reward in grpo.rewards"),
    (["train.objective=grpo", "grpo.rewards=[{type: regex}]"], "a regex reward needs `pattern`"),
    (["train.objective=grpo", "grpo.rewards=[{type: function, function: nocolon}]"], "must be written module:function"),
    (["train.objective=grpo", "grpo.rewards=[{type: regex, pattern: '('}]"], "is not a valid regular expression"),
    (["train.objective=grpo", "grpo.rewards=[{type: number}, {type: number, field: b}]"],
     "two rewards are named 'number'"),
])
def test_config_refuses_what_grpo_cannot_run(overrides, sentence):
    with pytest.raises(ConfigError, match=sentence):
        load_config(None, overrides)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_grpo_refuses_prompt_and_prefix_tuning(method):
    from loraft.objectives.grpo import check

    config = load_config(None, ["train.objective=grpo", "grpo.rewards=[{type: number}]", f"adapter.method={method}"])
    with pytest.raises(ConfigError, match=rf"^train.objective=grpo trains a LoRA-family adapter; adapter.method="
                                          rf"{method} is not supported by TRL's GRPOTrainer here$"):
        check(config)


def test_a_step_must_hold_whole_groups():
    from loraft.objectives.grpo import generations_fit

    config = load_config(None, ["train.objective=grpo", "grpo.rewards=[{type: number}]", "grpo.num_generations=3"])
    with pytest.raises(ConfigError, match=r"= 8 completions, which must be a multiple of grpo.num_generations \(3\)"):
        generations_fit(config, 1)


# ---------------------------------------------------------------------------------------------- rewards


def test_builtin_rewards():
    assert last_number("so 12 apples, then 1,234.5 left") == 1234.5 and last_number("none") is None
    assert number_match(["the answer is 42.", "41", "4 2", "x"], ["42", 41, "2", "1"]) == [1.0, 1.0, 1.0, 0.0]
    assert exact_match([" 06/01/2024 \n", "6/1/2024"], ["06/01/2024", "06/01/2024"]) == [1.0, 0.0]
    assert regex_match(["[WORD]", "[WORD] and more", "x\n[W]"], r"\[[A-Z]+\]") == [1.0, 0.0, 0.0]
    assert length_penalty([[1] * 4, [1] * 10, [1] * 16], 8) == [0.0, -0.25, -1.0]


def _columns(count: int) -> dict:
    return {RECORD_COLUMN: [f"p.jsonl, line {i + 1}" for i in range(count)], "answer": list(range(count))}


def test_a_reward_that_raises_names_the_record_it_raised_on():
    def picky(prompts, completions, completion_ids, answer, **rest):
        if 2 in answer:
            raise KeyError("two")
        return [1.0] * len(completions)

    reward = GuardedReward("picky", picky)
    assert reward(["p"] * 2, ["a", "b"], [[1], [2]], **_columns(2)) == [1.0, 1.0]
    with pytest.raises(RewardError, match=r"reward picky raised KeyError \('two'\) on the completion of "
                                          r"p.jsonl, line 3: 'c'"):
        reward(["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, **_columns(4))


@pytest.mark.parametrize("values, sentence", [
    (3.0, r"^reward r returned float, not a list of one number per completion \(2\)$"),
    ([1.0], r"reward r returned 1 values for 2 completions \(records from p.jsonl, line 1\)"),
    ([1.0, float("nan")], r"reward r returned nan for the completion of p.jsonl, line 2: a reward must be finite"),
    ([float("inf"), 0.0], r"reward r returned inf for the completion of p.jsonl, line 1"),
    ([1.0, "high"], r"reward r returned 'high' \(str\) for the completion of p.jsonl, line 2: a reward is a number"),
])
def test_a_reward_with_a_bad_value_names_the_reward_and_the_record(values, sentence):
    reward = GuardedReward("r", lambda **kwargs: values)
    with pytest.raises(RewardError, match=sentence):
        reward(["p", "p"], ["a", "b"], [[1], [2]], **_columns(2))


def test_none_is_not_applicable_as_in_trl_and_numbers_of_any_kind_pass():
    reward = GuardedReward("r", lambda **kwargs: [None, True, torch.tensor(0.5)])
    assert reward(["p"] * 3, ["a", "b", "c"], [[1]] * 3, **_columns(3)) == [None, 1.0, 0.5]


# ----------------------------------------------------------------------------------------------- data


def _settings(path: Path, *overrides: str, rewards: str = "[{type: number, field: answer}]"):
    return load_config(None, [f"data.path={path}", "train.objective=grpo", f"grpo.rewards={rewards}", *overrides])


def test_prompt_records_in_every_style_render_as_generation_encodes_them(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from loraft.generate import encode_prompt
    from loraft.objectives.kinds import record_kind
    from loraft.prompts import prepare
    from loraft.templates import get_template

    path = tmp_path / "mixed.jsonl"
    records = [
        {"instruction": "加法", "input": "1 加 2", "answer": 3},
        {"prompt": "2 加 2", "answer": "4"},
        {"prompt": [{"role": "system", "content": "算"}, {"role": "user", "content": "3 加 2"}], "answer": 5.0},
        {"messages": [{"role": "user", "content": "9"}, {"role": "assistant", "content": "9"},
                      {"role": "user", "content": "3 加 3"}], "answer": 6},
        {"conversations": [{"from": "human", "value": "3 加 4"}], "answer": 7, "note": None},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    settings = _settings(path)
    assert record_kind(settings).KIND == "prompts"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prepared = prepare(settings.model_copy(update={"model": settings.model}), tokenizer)
    train = prepared.train
    assert len(train) == 5 and prepared.report["samples_kept"] == 5
    template = get_template(settings.data.template, tokenizer)
    expected = [[{"role": "user", "content": "加法\n1 加 2"}], [{"role": "user", "content": "2 加 2"}],
                records[2]["prompt"], records[3]["messages"], [{"role": "user", "content": "3 加 4"}]]
    assert train["prompt_ids"] == [encode_prompt(tokenizer, template, messages) for messages in expected]
    assert train[RECORD_COLUMN] == [f"{path}, line {i}" for i in range(1, 6)]
    assert train["answer"] == ["3", "4", "5.0", "6", "7"]  # int, str and float across records: passed as text
    assert train["note"] == [None] * 5


@pytest.mark.parametrize("record, rewards, sentence", [
    ({"instruction": "x"}, "[{type: number, field: answer}]",
     r"p.jsonl, line 2, field 'answer': has no 'answer', which the number reward compares the completion with"),
    ({"instruction": "x", "answer": "many"}, "[{type: number, field: answer}]",
     r"p.jsonl, line 2, field 'answer': 'many' is not a number, which the number reward needs"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": 1},
     "[{type: number}]", r"p.jsonl, line 2, field 'messages': the prompt ends with a message from the assistant"),
    ({"question": "a", "answer": 1}, "[{type: number}]", r"p.jsonl, line 2: no prompt among its fields"),
])
def test_data_check_names_the_record_and_field(tmp_path, capsys, record, rewards, sentence):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"instruction": "ok", "answer": 1}) + "\n" + json.dumps(record) + "\n",
                    encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(f"train: {{objective: grpo}}\ngrpo: {{rewards: {rewards}}}\n", encoding="utf-8")
    assert main(["data", "check", str(path), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(sentence, err), err


def test_prompts_longer_than_max_length_are_dropped_and_counted(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from loraft.prompts import DROPPED_LONG_PROMPT, tokenize_prompts, read_prompts
    from loraft.templates import get_template

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"instruction": "1 2 3 4 5 6 7 8 9 0 " * 8, "answer": 1}) + "\n"
                    + json.dumps({"instruction": "短", "answer": 2}) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    records = read_prompts(str(path), _settings(path).data)[0]
    dataset, report = tokenize_prompts(records, tokenizer, get_template("human_assistant", tokenizer), 40, str(path))
    assert len(dataset) == 1 and report["dropped"] == {DROPPED_LONG_PROMPT: 1} and dataset["answer"] == [2]
    with pytest.raises(DataError, match="the only prompt is longer than data.max_length 40"):
        tokenize_prompts(records[:1], tokenizer, get_template("human_assistant", tokenizer), 40, str(path))


# ---------------------------------------------------------------------------------------------- training


def test_a_run_writes_its_rewards_completions_and_a_standard_adapter(tiny_llama_dir, tmp_path, in_tests_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    config = grpo_yaml(tiny_llama_dir, data, run,
                       "[{type: function, function: 'test_grpo:digit_share'}, {type: number, weight: 0.5}]")
    assert main(["train", str(config)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert {"reward", "reward_std", "rewards/digit_share/mean", "rewards/number/mean", "completions/mean_length",
                "generation_seconds"} <= set(m) and m["generation_seconds"] > 0
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [c["step"] for c in completions] == [s for s in (1, 2, 3) for _ in range(8)]
    assert all(set(c["rewards"]) == {"digit_share", "number"} and c["prompt"].startswith("Human: 请计算")
               and math.isfinite(c["advantage"]) for c in completions)
    assert "rollout             2 prompt(s) a step x 4 completions of <= 10 tokens" in (run / "train.log").read_text()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_reward_rises_on_a_tiny_model(tiny_llama_dir, tmp_path, in_tests_dir):
    """The share of digits in 6-token completions, from ~0.05 (random weights) to most of the completion, with the
    output layer trained in full (a LoRA on q/v alone barely moves a 32-wide model's output in 16 steps)."""
    data = write_prompts(tmp_path / "p.jsonl", 32)
    run = tmp_path / "run"
    config = grpo_yaml(tiny_llama_dir, data, run, "[{type: function, function: 'test_grpo:digit_share'}]", steps=16)
    assert main(["train", str(config), "train.learning_rate=0.3", "grpo.max_completion_length=6",
                 "adapter.modules_to_save=[lm_head]"]) == 0
    rewards = [json.loads(line)["reward"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "reward" in json.loads(line)]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.2 and last > first + 0.5, rewards


def test_a_reward_that_raises_stops_the_run_with_one_sentence(tiny_llama_dir, tmp_path, capsys, in_tests_dir):
    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    config = grpo_yaml(tiny_llama_dir, data, run, "[{type: function, function: 'test_grpo:raises_on_three'}]",
                       steps=8)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"reward raises_on_three raised ValueError (no sixes here) on the completion of {data}, line 4" in err[-1]
    assert json.loads((run / "loraft_run.json").read_text())["status"] == "failed"


def test_a_reward_function_that_cannot_be_imported_is_one_sentence(tiny_llama_dir, tmp_path, capsys):
    data = write_prompts(tmp_path / "p.jsonl")
    config = grpo_yaml(tiny_llama_dir, data, tmp_path / "run", "[{type: function, function: 'no_such_mod:f'}]")
    assert main(["train", str(config)]) == 2
    assert "grpo reward function no_such_mod:f: cannot import no_such_mod" in capsys.readouterr().err


def test_a_killed_run_resumes_to_the_uninterrupted_adapter(tiny_llama_dir, tmp_path):
    """kill -9 as checkpoint-4 is moved into place (steps 3 and 4 lost), resume from checkpoint-2: the adapter and
    the logged steps and completions equal the uninterrupted run's (fp32, one thread, sampling included)."""
    data = write_prompts(tmp_path / "p.jsonl")
    rewards = "[{type: number}, {type: regex, pattern: '.*[0-9].*', weight: 0.5}]"
    reference = tmp_path / "reference"
    with one_thread():
        assert main(["train", str(grpo_yaml(tiny_llama_dir, data, reference, rewards, steps=6, save_steps=2))]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KILL_ON": "os.rename|checkpoints/checkpoint-4",
           "PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")])}
    config = grpo_yaml(tiny_llama_dir, data, killed, rewards, steps=6, save_steps=2)
    process = subprocess.run([sys.executable, "-m", "loraft.cli", "train", str(config)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == -9, process.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    with one_thread():
        assert main(["train", str(config), "--resume"]) == 0
    final, expected = load_file(killed / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)

    def logged(run_dir: Path, name: str) -> list:
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]

    assert [m["step"] for m in logged(killed, "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert [(c["step"], c["completion"]) for c in logged(killed, "completions.jsonl")] == \
        [(c["step"], c["completion"]) for c in logged(reference, "completions.jsonl")]


def test_losses_and_adapter_equal_trls_own_grpotrainer(tiny_llama_dir, tmp_path):
    """The same settings (loraft's GRPOConfig), data and seed through plain TRL (its own prompt tokenization,
    generate and reward call) and through `loraft train`: the same losses and the same adapter, so loraft's prompt
    ids, guarded rewards, timing and run guarantees change nothing TRL computes (fp32)."""
    from datasets import Dataset
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOTrainer

    from loraft.model import build_peft_config
    from loraft.objectives.grpo import arguments
    from loraft.plan import plan_run, read_model_config

    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    path = grpo_yaml(tiny_llama_dir, data, run, "[{type: number}]", steps=3)
    with one_thread():
        assert main(["train", str(path)]) == 0
    loraft_losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                     if "loss" in m]

    config = load_config(path, [f"output_dir={tmp_path / 'trl'}"])
    plan = plan_run(config, read_model_config(config)[0], measure=False)
    args = arguments(config, plan, tmp_path / "trl", False)
    args.reward_weights = [1.0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.padding_side = "left"
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_dict({"prompt": [f"Human: {r['instruction']}\n\nAssistant: " for r in records],
                                 "answer": [r["answer"] for r in records]})

    def number(completions, answer, **kwargs):
        return number_match(completions, answer)

    with one_thread():
        set_seed(config.train.seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=[number], args=args, train_dataset=dataset,
                              processing_class=tokenizer,
                              peft_config=build_peft_config(config.adapter, tokenizer, str(tiny_llama_dir)))
        trainer.train()
    trl_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trl_losses == loraft_losses
    theirs = get_peft_model_state_dict(trainer.model)
    ours = load_file(run / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_eval_reports_each_rewards_mean_and_pass_at_1_for_run_and_base(tiny_llama_dir, tmp_path, capsys):
    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    rewards = "[{type: number}, {type: length, max_tokens: 4}]"
    assert main(["train", str(grpo_yaml(tiny_llama_dir, data, run, rewards, steps=2))]) == 0
    held_out = write_prompts(tmp_path / "held_out.jsonl", 5)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(held_out), "--base", "--no-retention"]) == 0
    table = capsys.readouterr().out
    assert "5 prompts from" in table and "base pass@1%" in table and "adapter pass@1%" in table
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for column in ("base", "adapter"):
        entry = metrics["rewards"][column]
        assert set(entry) == {"number", "length", "all"} and entry["number"]["scored"] == 5
        assert 0 <= entry["all"]["pass@1"] <= min(entry["number"]["pass@1"], entry["length"]["pass@1"])
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(set(r["rewards"]) == {"number", "length"} and "base_prediction" in r for r in rows)
    assert rows[0]["rewards"]["length"] == -max(0, len(
        __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama_dir)(
            rows[0]["prediction"], add_special_tokens=False)["input_ids"]) - 4) / 4


def test_two_process_grpo_writes_one_run_directory(tiny_llama_dir, tmp_path):
    """torchrun, 2 ranks x 4 completions a step: the step's 8 completions (2 prompts x 4) are gathered, each step is
    logged once with all 8, and only rank 0 writes the run directory (rank 1 stages its RNG state per checkpoint)."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend")
    data = write_prompts(tmp_path / "p.jsonl")
    run = (tmp_path / "run").resolve()
    config = grpo_yaml(tiny_llama_dir, data, run, "[{type: number}]", steps=3, save_steps=2)
    audit = tmp_path / "writes"
    audit.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "LORAFT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "write_audit"),
                                                       os.environ.get("PYTHONPATH")])),
           "WRITE_AUDIT_DIR": str(run), "WRITE_AUDIT_LOG_DIR": str(audit)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "loraft.cli", "train", str(config),
               "train.gradient_accumulation_steps=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [c["step"] for c in completions] == [s for s in (1, 2, 3) for _ in range(8)]
    assert "rollout             2 prompt(s) a step x 4 completions" in (run / "train.log").read_text()
    assert json.loads((run / "loraft_run.json").read_text())["status"] == "finished"
    writes = [set((audit / f"rank{rank}.txt").read_text().splitlines()) for rank in range(2)]
    assert {"open metrics.jsonl", "open train.log", "open completions.jsonl"} <= writes[0]
    assert all(write.startswith("os.mkdir checkpoints") for write in writes[1]), writes[1]


def test_a_bf16_plan_generates_and_trains(tiny_llama_dir, tmp_path):
    """train.precision=bf16 stores the frozen weights in bf16: generation runs under the plan's autocast (it failed
    with a dtype mismatch without it), on any machine (where bf16 is emulated, slowly: a tiny model, 2 steps). The
    other tests of this file run the fp32 branch."""
    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    assert main(["train", str(grpo_yaml(tiny_llama_dir, data, run, "[{type: number}]", steps=2)),
                 "train.precision=bf16"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert all(m["generation_seconds"] > 0 for m in metrics if "loss" in m)
    assert "precision           bf16" in (run / "train.log").read_text()


@pytest.fixture(scope="module")
def tied_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama's shape with lm_head tied to the input embedding (SmolLM2's and Qwen2-0.5B's layout): the head
    stays fp32 under a bf16 plan, as the looked-up embedding does (loraft.weights.cast_frozen_weights)."""
    from transformers import AutoConfig, AutoTokenizer

    from conftest import save_random_model

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = True
    return save_random_model(tmp_path_factory.mktemp("tied-llama"), AutoTokenizer.from_pretrained(tiny_llama_dir),
                             config)


def test_a_tied_head_cast_once_computes_what_autocast_does(tied_llama_dir):
    """HeadCastOnce gives the head's logits autocast gives, bit for bit, and leaves the head as it found it; it does
    nothing without autocast, for a trainable head, or for a head already in the autocast dtype."""
    from transformers import AutoModelForCausalLM

    from loraft.weights import HeadCastOnce, cast_frozen_weights

    model = AutoModelForCausalLM.from_pretrained(tied_llama_dir, dtype=torch.float32).eval()
    cast_frozen_weights(model, torch.bfloat16)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight and head.weight.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 33, 2, 7], [1, 8, 8, 40, 3, 9]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids).logits
        with HeadCastOnce(model) as cast:
            assert "forward" in vars(head) and cast.head is head
            once = model(ids).logits
        assert "forward" not in vars(head)
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, once)
    with torch.no_grad(), HeadCastOnce(model) as cast:  # no autocast: fp32 as it is
        assert cast.head is None and "forward" not in vars(head)
    head.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), HeadCastOnce(model) as cast:  # a trainable head: autocast's
        assert cast.head is None and "forward" not in vars(head)


def _grpo_losses_and_adapter(model_dir: Path, tmp_path: Path, name: str, *overrides: str,
                             rewards: str = "[{type: number}]"):
    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / name
    with one_thread():
        assert main(["train", str(grpo_yaml(model_dir, data, run, rewards, steps=2)), *overrides]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    return ([m["loss"] for m in metrics if "loss" in m], [c["completion"] for c in completions],
            load_file(run / "adapter_model.safetensors"))


def test_each_generation_speed_up_keeps_the_loss_equal(tied_llama_dir, tmp_path, monkeypatch):
    """The speed-ups of GRPO's generation change no loss: the head cast once per generate call (a bf16 plan, a
    tied head) against autocast's cast at every token, and the KV cache against recomputing every position (fp32);
    the same completions, losses and adapter, bit for bit."""
    import contextlib

    from loraft.objectives import grpo

    logged = "grpo.completions_logged=8"
    fast = _grpo_losses_and_adapter(tied_llama_dir, tmp_path, "cast-once", "train.precision=bf16", logged)
    with monkeypatch.context() as patch:
        patch.setattr(grpo, "HeadCastOnce", lambda model: contextlib.nullcontext())
        slow = _grpo_losses_and_adapter(tied_llama_dir, tmp_path, "cast-each-token", "train.precision=bf16", logged)
    assert fast[0] == slow[0] and fast[1] == slow[1] and len(fast[1]) == 16
    assert sorted(fast[2]) == sorted(slow[2]) and all(torch.equal(fast[2][k], slow[2][k]) for k in fast[2])

    cached = _grpo_losses_and_adapter(tied_llama_dir, tmp_path, "kv-cache", logged)
    arguments = grpo.arguments

    def without_cache(*args, **kwargs):
        made = arguments(*args, **kwargs)
        made.generation_kwargs = {"use_cache": False}
        return made

    with monkeypatch.context() as patch:
        patch.setattr(grpo, "arguments", without_cache)
        recomputed = _grpo_losses_and_adapter(tied_llama_dir, tmp_path, "no-cache", logged)
    assert cached[0] == recomputed[0] and cached[1] == recomputed[1]
    assert all(torch.equal(cached[2][k], recomputed[2][k]) for k in cached[2])


def test_a_resume_that_changes_the_grpo_settings_is_refused(tiny_llama_dir, tmp_path):
    """The rewards, sampling and loss are part of the run's identity (what completions.jsonl keeps is not): a resume
    that changes them continues another training and is refused, naming the setting."""
    from loraft.errors import RunError
    from loraft.rundir import RUN_FILE, RunDir, run_identity

    data = write_prompts(tmp_path / "p.jsonl")
    path = grpo_yaml(tiny_llama_dir, data, tmp_path / "run", "[{type: number}]")
    config = load_config(path)
    report = {"template": "human_assistant", "fingerprint": "f"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps({"status": "running",
                                                         "identity": run_identity(config, report)}))
    RunDir(tmp_path / "run").check_resume_identity(load_config(path, ["grpo.completions_logged=2"]), report)
    with pytest.raises(RunError, match=r"--resume refused: grpo.temperature changed \(1.0 -> 0.5\)"):
        RunDir(tmp_path / "run").check_resume_identity(load_config(path, ["grpo.temperature=0.5"]), report)


def test_attention_for_switches_and_restores(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from loraft.objectives.grpo import AttentionFor

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    with AttentionFor(model, "sdpa"):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "eager"
    with AttentionFor(model, None):
        assert model.config._attn_implementation == "eager"


def test_where_the_autotune_picks_eager_generation_keeps_the_librarys_default(tiny_llama_dir, tmp_path, monkeypatch):
    """The update trains with the attention the autotune measured faster (eager, say); generation, forward only and
    one token a row, runs with the library's default (sdpa) and goes back to eager for the update."""
    from loraft import tune
    from loraft.objectives import grpo

    monkeypatch.setenv("LORAFT_AUTOTUNE", "1")
    monkeypatch.setattr(tune, "measure_attention", lambda *args, **kwargs: {
        "key": {}, "seconds": 0.0, "layouts": {}, "choice": {"attention": "eager"}})
    seen = []

    class Recording(grpo.AttentionFor):
        def __enter__(self):
            entered = super().__enter__()
            seen.append((self.previous, self.model.config._attn_implementation))
            return entered

    monkeypatch.setattr(grpo, "AttentionFor", Recording)
    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    assert main(["train", str(grpo_yaml(tiny_llama_dir, data, run, "[{type: number}]", steps=2)),
                 "grpo.max_completion_length=7"]) == 0
    assert "attention           eager  (measured faster than the library default" in (run / "train.log").read_text()
    assert seen == [("eager", "sdpa")] * 2  # one generate call a step


def test_the_update_in_micro_batches_trains_what_one_batch_does(tiny_llama_dir, tmp_path, in_tests_dir):
    """A step's completions updated in micro-batches (train.per_device_train_batch_size x
    gradient_accumulation_steps, the same product) is the same step: one generate call of all of them (TRL's
    steps_per_generation follows the accumulation), the same completions, and the same losses and adapter up to
    fp32 summation order (a step moves the weights by up to the learning rate, 0.3; the two differ by 2.4e-4). It is
    the setting that holds GRPO's peak memory below TRL's documented default (docs/benchmarks.md, GRPO)."""
    def trained(name: str, per_device: int, accumulation: int):
        return _grpo_losses_and_adapter(
            tiny_llama_dir, tmp_path, name, "train.learning_rate=0.3", "adapter.modules_to_save=[lm_head]",
            "grpo.completions_logged=8", f"train.per_device_train_batch_size={per_device}",
            f"train.gradient_accumulation_steps={accumulation}",
            rewards="[{type: function, function: 'test_grpo:digit_share'}]")

    whole, split = trained("whole", 8, 1), trained("split", 2, 4)
    assert whole[1] == split[1] and len(whole[1]) == 16  # the same completions, 8 a step
    assert any(loss != 0 for loss in whole[0]), whole[0]  # the rewards differed within groups: a real update
    assert whole[0] == pytest.approx(split[0], rel=1e-4, abs=1e-6), (whole[0], split[0])
    assert sorted(whole[2]) == sorted(split[2])
    assert any(float(value.abs().max()) > 0 for key, value in whole[2].items() if "lora_B" in key)  # it moved
    for key in whole[2]:  # Adam at lr 0.3 turns summation-order noise in near-zero gradients into up to ~2e-4
        assert torch.allclose(whole[2][key], split[2][key], rtol=0, atol=1e-3), key
