"""The demo's RL stage (`loraft demo --stage rl`): the long-input prompts, the shipped config, the stage end to end
with reduced settings, and the command line. The real stage (its gain and its time) is measured in the README."""

from __future__ import annotations

import json
from pathlib import Path

from loraft import demo
from loraft.demo import rl as demo_rl

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.max_steps=2", "train.per_device_train_batch_size=8", "grpo.num_generations=4",
        "grpo.max_completion_length=8", "train.logging_steps=1"]


def test_held_out_rl_prompts_are_longer_than_any_sft_input_and_never_train():
    sft_train, sft_heldout = demo.make_records(seed=0)
    longest = {name: max(len(r["input"]) for r in sft_train + sft_heldout if r["task"] == name) for name in demo.TASKS}
    train, heldout = demo.make_rl_records(seed=0)
    for record in train + heldout:
        family = demo.TASKS[record["task"]]
        assert record["answer"] == family.answer(record["input"]) and record["instruction"] in family.instructions
    assert all(len(r["input"]) > longest[r["task"]] for r in heldout)
    # the training prompts span the SFT lengths and the longer ones (the reward teaches where to stop too)
    for name in demo.LONGER:
        lengths = {len(r["input"]) for r in train if r["task"] == name}
        assert min(lengths) <= longest[name] < max(lengths), (name, lengths)
    assert {r["input"] for r in heldout}.isdisjoint(r["input"] for r in train)
    assert all(demo.is_heldout_input(r["input"]) for r in heldout)
    assert len(heldout) == len(demo.LONGER) * 40 and len(train) == len(demo.LONGER) * 200


def test_place_accuracy_counts_units_in_place_over_the_longer():
    from loraft.demo.rl import place_accuracy

    assert place_accuracy(["ABCD", "ABC", "ABCDE", " ABXD\n", "one two", "one three two"],
                          ["ABCD", "ABCD", "ABCD", "ABCD", "one two three", "one two three"]) == [
        1.0, 0.75, 0.8, 0.75, 2 / 3, 1 / 3]


def test_the_shipped_config_is_grpo_with_the_exact_answer_reward_and_cuts_no_prompt(tmp_path):
    from transformers import AutoTokenizer

    from loraft.config import load_config
    from loraft.prompts import read_prompts, tokenize_prompts
    from loraft.templates import get_template

    path = REPO / "configs" / "demo-rl.yaml"
    assert path.resolve() == demo.RL_CONFIG
    config = load_config(path)
    assert config.train.objective == "grpo" and config.model.adapter_from == "loraft-demo/run"
    assert [(r.type, r.field, r.function) for r in config.grpo.rewards] == [
        ("exact_match", "answer", None), ("function", "answer", "loraft.demo.rl:place_accuracy")]
    assert config.data.template == load_config(REPO / "configs" / "demo.yaml").data.template
    tokenizer = AutoTokenizer.from_pretrained(demo.PREBUILT_DIR)
    for prompts_path in demo.write_rl_data(tmp_path, seed=0):
        records = read_prompts(str(prompts_path), config.data.model_copy(update={"path": str(prompts_path)}))[0]
        _, report = tokenize_prompts(records, tokenizer, get_template(config.data.template), config.data.max_length)
        assert report["dropped"] == {}, prompts_path
        longest_answer = max(len(tokenizer(json.loads(line)["answer"])["input_ids"])
                             for line in prompts_path.read_text(encoding="utf-8").splitlines())
        assert longest_answer < config.grpo.max_completion_length


def test_the_stage_runs_grpo_from_the_sft_run_and_reports(monkeypatch, tmp_path):
    from loraft.rundir import read_record
    from test_demo_preference import FAST as SFT_FAST, _tiny_sft_demo

    monkeypatch.setattr(demo_rl, "run_demo", _tiny_sft_demo)
    assert SFT_FAST
    workdir, lines = tmp_path / "demo", []
    results = demo.run_rl_demo(workdir, train_per_task=4, heldout_per_task=2, overrides=FAST, log=lines.append,
                               tasks=("upper", "numerals"))
    assert lines[0].startswith(f"rl stage: {workdir / 'run'} holds no finished SFT demo run")
    assert any(line.startswith("[4/4] after: the GRPO run: exact match") for line in lines)
    run_dir = workdir / "rl-run"
    record = read_record(run_dir)
    assert record["status"] == "finished" and record["objective"] == "grpo"
    assert record["adapter_from"] == str(workdir / "run")
    assert (run_dir / "completions.jsonl").is_file()
    saved = json.loads((workdir / "rl_results.json").read_text(encoding="utf-8"))
    for side in ("before", "after"):
        assert set(saved[side]["per_task"]) == {"upper", "numerals"} and len(saved[side]["predictions"]) == 4
    assert results["run_dir"] == run_dir


def test_loraft_demo_stage_rl_reaches_the_stage(monkeypatch, tmp_path, capsys):
    import loraft.demo
    from loraft.cli import STOPPED_EXIT_CODE, main
    from loraft.train import TrainingStopped

    calls = []
    monkeypatch.setattr(loraft.demo, "run_rl_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--stage", "rl", "--workdir", str(tmp_path), "--overwrite"]) == 0
    assert [kwargs["overwrite"] for kwargs in calls] == [True]

    def stopped(**kwargs):
        raise TrainingStopped(tmp_path / "rl-run", 3, None)

    monkeypatch.setattr(loraft.demo, "run_rl_demo", stopped)
    assert main(["demo", "--stage", "rl", "--workdir", str(tmp_path)]) == STOPPED_EXIT_CODE
    assert capsys.readouterr().err == (f"{tmp_path / 'rl-run'}: stopped before its first checkpoint; run "
                                       "loraft demo --stage rl --overwrite to start it again\n")


def test_a_previous_rl_run_is_never_replaced_without_overwrite(tmp_path):
    from loraft.errors import RunError

    previous = tmp_path / "rl-run"
    previous.mkdir()
    (previous / "adapter_model.safetensors").write_bytes(b"weights")
    try:
        demo_rl.run_rl_demo(tmp_path)
    except RunError as refused:
        assert str(refused) == f"{previous}: holds a previous RL demo run; pass --overwrite to replace it"
    else:
        raise AssertionError("the previous RL run was not protected")
    assert (previous / "adapter_model.safetensors").read_bytes() == b"weights"
