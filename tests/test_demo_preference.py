"""The demo's preference stage (`loraft demo --stage preference`): the generated pairs, the shipped config, the stage
end to end with reduced settings, and the command line.

The real stage (1000 pairs, 40 DPO steps on the SFT demo's run) is measured in the README, not here: the end-to-end
test trains the SFT run and the DPO run 2 steps each on the shipped demo base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraft import demo
from loraft.demo import preference as demo_preference

REPO = Path(__file__).resolve().parents[1]


def test_chosen_follows_the_rule_and_rejected_is_the_same_answer_without_it():
    train, heldout = demo.make_preference_records(seed=0)
    for pair in train + heldout:
        family = demo.TASKS[pair["task"]]
        assert demo.follows_rule(pair["chosen"]), pair
        assert not demo.follows_rule(pair["rejected"]), pair
        # the same content: both are the family's correct answer, the pair differs only by the rule
        assert pair["rejected"] == family.answer(pair["input"])
        assert demo.without_rule(pair["chosen"]) == pair["rejected"]
        assert pair["chosen"] == pair["rejected"] + demo.RULE_MARK
        assert pair["instruction"] in family.instructions


def test_the_rule_is_one_the_sft_demo_never_shows():
    sft_train, _ = demo.make_records(seed=0)
    assert not any(demo.RULE_MARK in record["output"] for record in sft_train)
    assert not any(demo.follows_rule(record["output"]) for record in sft_train)


def test_rule_checks():
    assert demo.follows_rule("ABC。") and demo.follows_rule(" ABC。\n")
    assert not demo.follows_rule("ABC") and not demo.follows_rule("ABC。。") and not demo.follows_rule("A。BC。")
    assert demo.without_rule("ABC。") == "ABC" and demo.without_rule("ABC") == "ABC"
    assert demo.without_rule("ABC。。") == "ABC。"  # a doubled mark is not the correct content
    assert demo.with_rule("三零五") == "三零五。"


def test_heldout_pairs_never_share_an_input_with_training():
    train, heldout = demo.make_preference_records(seed=0)
    heldout_inputs = {pair["input"] for pair in heldout}
    assert heldout_inputs.isdisjoint(pair["input"] for pair in train)
    assert all(demo.is_heldout_input(text) for text in heldout_inputs)
    sft_train, _ = demo.make_records(seed=0)
    assert heldout_inputs.isdisjoint(record["input"] for record in sft_train)
    for pairs in (train, heldout):
        assert {pair["task"] for pair in pairs} == set(demo.TASKS)
    assert len({(pair["task"], pair["input"]) for pair in heldout}) == len(heldout) == 5 * 40


def test_pair_files_are_deterministic_and_read_as_preference_pairs(tmp_path):
    from loraft.config import DataConfig
    from loraft.records import read_preferences_with_report

    first = demo.write_preference_data(tmp_path / "a", seed=0)
    second = demo.write_preference_data(tmp_path / "b", seed=0)
    other = demo.write_preference_data(tmp_path / "c", seed=1)
    assert [p.name for p in first] == ["preference_train.jsonl", "preference_heldout.jsonl"]
    for path_a, path_b, path_c in zip(first, second, other):
        assert path_a.read_bytes() == path_b.read_bytes() != path_c.read_bytes()
    for path in first:
        pairs = demo.read_jsonl(path)
        assert all(set(pair) == {"instruction", "input", "chosen", "rejected", "task"} for pair in pairs)
        # data.format auto reads them as alpaca-style pairs, as `loraft train` does
        preferences, _ = read_preferences_with_report(str(path), DataConfig(path=str(path)))
        assert len(preferences) == len(pairs)
        assert [(p["chosen"], p["rejected"]) for p in preferences] == [(p["chosen"], p["rejected"]) for p in pairs]


def test_demo_preference_config_parses_and_cuts_no_pair(tmp_path):
    from transformers import AutoTokenizer

    from loraft.config import DataConfig, load_config
    from loraft.preference import tokenize_preferences
    from loraft.records import read_preferences_with_report
    from loraft.templates import get_template

    path = REPO / "configs" / "demo-preference.yaml"
    assert path.resolve() == demo.PREFERENCE_CONFIG
    assert path.read_text(encoding="utf-8").splitlines()[0] == "# loraft demo --stage preference"
    config = load_config(path)
    assert config.train.objective == "dpo" and config.model.adapter_from == "loraft-demo/run"
    assert config.data.template == load_config(REPO / "configs" / "demo.yaml").data.template  # the SFT run's prompts
    tokenizer = AutoTokenizer.from_pretrained(demo.PREBUILT_DIR)
    for pairs_path in demo.write_preference_data(tmp_path, seed=0):
        preferences, _ = read_preferences_with_report(str(pairs_path), DataConfig(path=str(pairs_path)))
        _, report = tokenize_preferences(preferences, tokenizer, get_template(config.data.template),
                                         config.data.max_length, config.preference)
        assert report["truncated_prompts"] == 0, pairs_path
        assert report["truncated_completions"] == {"chosen": 0, "rejected": 0}, pairs_path


# ------------------------------------------------------------------------------------------- end to end
FAST = ["train.max_steps=2", "train.per_device_train_batch_size=2", "train.warmup_steps=0", "train.logging_steps=1"]


def _tiny_sft_demo(workdir, overwrite=False, home=None, seed=0, rebuild_base=False, log=print):
    """run_demo's contract (a finished SFT run in workdir/run) in 2 steps on the shipped base."""
    from loraft.config import load_config
    from loraft.train import train

    train_path, _ = demo.write_demo_data(Path(workdir) / "data", seed=seed)
    config = load_config(demo.DEFAULT_CONFIG, [
        f"model.name_or_path={demo.PREBUILT_DIR}", f"data.path={train_path}", "data.limit=8",
        f"output_dir={Path(workdir) / 'run'}", *FAST])
    return {"run_dir": train(config, progress_bar=False)}


def test_the_stage_runs_the_sft_demo_first_then_dpo_and_reports(monkeypatch, tmp_path):
    from loraft.errors import RunError
    from loraft.rundir import read_record

    sft_calls: list[Path] = []

    def run_demo(workdir, **kwargs):
        sft_calls.append(Path(workdir))
        return _tiny_sft_demo(workdir, **kwargs)

    monkeypatch.setattr(demo_preference, "run_demo", run_demo)
    workdir, lines = tmp_path / "demo", []
    settings = dict(train_per_task=4, heldout_per_task=2, overrides=FAST, log=lines.append)
    results = demo.run_preference_demo(workdir, **settings)

    assert sft_calls == [workdir]
    assert lines[0] == (f"preference stage: {workdir / 'run'} holds no finished SFT demo run, so the SFT demo "
                        "(`loraft demo`) runs first")
    assert any(line.startswith("[4/4] after: the DPO run") for line in lines)
    run_dir = workdir / "preference-run"
    assert results["run_dir"] == run_dir
    record = read_record(run_dir)
    assert record["status"] == "finished" and record["objective"] == "dpo"
    assert record["adapter_from"] == str(workdir / "run")
    assert {p.name for p in (workdir / "data").glob("preference_*.jsonl")} == {
        "preference_train.jsonl", "preference_heldout.jsonl"}
    saved = json.loads((workdir / "preference_results.json").read_text(encoding="utf-8"))
    for side in ("before", "after"):
        assert set(saved[side]["per_task"]) == set(demo.TASKS)
        assert len(saved[side]["predictions"]) == 5 * 2
        assert 0.0 <= saved[side]["rule_following"] <= 1.0 and 0.0 <= saved[side]["content_exact_match"] <= 1.0
    accuracy = saved["preference_accuracy"]
    assert accuracy["adapter"]["measure"] == "implicit reward" and accuracy["reference"]["measure"] == "log-probability"
    assert accuracy["adapter"]["pairs"] == 5 * 2
    assert (workdir / "preference-eval" / "metrics.json").is_file()

    # a finished preference run is never replaced without overwrite; with it, the finished SFT run is reused
    with pytest.raises(RunError) as refused:
        demo.run_preference_demo(workdir, **settings)
    assert str(refused.value) == f"{run_dir}: holds a previous preference demo run; pass --overwrite to replace it"
    lines.clear()
    demo.run_preference_demo(workdir, overwrite=True, rebuild_base=True, **settings)
    assert sft_calls == [workdir]
    assert lines[0] == (f"preference stage: {workdir / 'run'} is a finished SFT demo run, so its base is used "
                        "(--rebuild-base ignored)")


def test_an_unfinished_sft_run_is_not_used(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "loraft_run.json").write_text('{"status": "stopped"}', encoding="utf-8")
    assert demo_preference.finished_sft_run(tmp_path / "run") is None
    assert demo_preference.finished_sft_run(tmp_path / "missing") is None


def test_loraft_demo_stage_reaches_the_stage(monkeypatch, tmp_path, capsys):
    import loraft.demo
    from loraft.cli import STOPPED_EXIT_CODE, main
    from loraft.train import TrainingStopped

    calls = []
    monkeypatch.setattr(loraft.demo, "run_demo", lambda **kwargs: calls.append(("sft", kwargs)))
    monkeypatch.setattr(loraft.demo, "run_preference_demo", lambda **kwargs: calls.append(("preference", kwargs)))
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    assert main(["demo", "--stage", "preference", "--workdir", str(tmp_path), "--overwrite"]) == 0
    assert [(stage, kwargs["overwrite"]) for stage, kwargs in calls] == [("sft", False), ("preference", True)]

    def stopped(**kwargs):
        raise TrainingStopped(tmp_path / "preference-run", 3, None)

    monkeypatch.setattr(loraft.demo, "run_preference_demo", stopped)
    assert main(["demo", "--stage", "preference", "--workdir", str(tmp_path)]) == STOPPED_EXIT_CODE
    assert capsys.readouterr().err == (f"{tmp_path / 'preference-run'}: stopped before its first checkpoint; run "
                                       "loraft demo --stage preference --overwrite to start it again\n")
