"""The demo's preference stage (`loraft demo --stage preference`): DPO teaches the SFT demo's run one rule it never saw.

The rule: end the answer with "。" (RULE_MARK). The SFT data and the pretraining corpus never end an answer with it,
so the SFT run answers bare. Each generated pair holds one prompt of the SFT task families and the correct answer
twice: chosen follows the rule ("ABC。"), rejected is the bare answer SFT taught ("ABC"). The pair differs only by
the rule, so the shared answer tokens cancel in DPO's sigmoid loss: it rewards the rule and nothing in it holds the
answer in place, which is why the content is measured too (on the demo base the sigmoid loss alone lengthens the
answers to move their end: README).

Before is the SFT run (DPO's starting point and reference), after the DPO run, both on held-out prompts whose inputs
never appear in training: preference accuracy (loraft.evaluate_preference: the SFT run by log-probability, the DPO
run by its implicit reward), the share of greedy answers that follow the rule, and the share whose content is correct
apart from the rule.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from loraft.demo.run import _sample_chat, demo_train, exact_match, run_demo
from loraft.demo.tasks import TASK_FAMILIES, _write_jsonl, make_records, read_jsonl
from loraft.files import write_json_atomically

PREFERENCE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-preference.yaml"  # package data
RULE_MARK = "。"


# ----------------------------------------------------------------------------------------------- rule
def with_rule(answer: str) -> str:
    """The answer following the rule: the correct answer, then RULE_MARK."""
    return answer + RULE_MARK


def follows_rule(answer: str) -> bool:
    """Whether an answer ends with RULE_MARK and holds it nowhere else (surrounding whitespace ignored)."""
    answer = answer.strip()
    return answer.endswith(RULE_MARK) and RULE_MARK not in answer[:-len(RULE_MARK)]


def without_rule(answer: str) -> str:
    """The answer's content: the answer with one final RULE_MARK removed."""
    answer = answer.strip()
    return answer[:-len(RULE_MARK)] if answer.endswith(RULE_MARK) else answer


# ----------------------------------------------------------------------------------------------- data
def make_preference_records(seed: int = 0, train_per_task: int = 200,
                            heldout_per_task: int = 40) -> tuple[list[dict], list[dict]]:
    """Alpaca-style pairs {"instruction", "input", "chosen", "rejected", "task"} for every task family.

    The prompts are drawn as the SFT demo's (make_records), so the held-out inputs never appear in training.
    chosen = with_rule(correct answer), rejected = the correct answer alone.

    Returns:
        (train, heldout).
    """
    def pair(record: dict) -> dict:
        return {"instruction": record["instruction"], "input": record["input"], "chosen": with_rule(record["output"]),
                "rejected": record["output"], "task": record["task"]}

    train, heldout = make_records(seed, train_per_task, heldout_per_task)
    return [pair(r) for r in train], [pair(r) for r in heldout]


def write_preference_data(out_dir: Path, seed: int = 0, train_per_task: int = 200,
                          heldout_per_task: int = 40) -> tuple[Path, Path]:
    """Write the pairs as `preference_train.jsonl` and `preference_heldout.jsonl` under out_dir.

    Returns:
        (train_path, heldout_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = make_preference_records(seed, train_per_task, heldout_per_task)
    train_path, heldout_path = out_dir / "preference_train.jsonl", out_dir / "preference_heldout.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(heldout_path, heldout)
    return train_path, heldout_path


# ----------------------------------------------------------------------------------------- evaluation
def rule_following(model, tokenizer, pairs: Sequence[dict], max_new_tokens: int) -> dict:
    """Greedy answers to the pairs' prompts (exact_match's generation): how many follow the rule, and how many are
    correct apart from it.

    Returns:
        {"rule_following", "content_exact_match", "exact_match" (rule and content), "per_task": {task:
        {"rule_following", "content_exact_match", "total"}}, "predictions"}.
    """
    answered = exact_match(model, tokenizer, [{**pair, "output": pair["chosen"]} for pair in pairs], max_new_tokens)
    predictions = answered["predictions"]
    per_task: dict[str, dict] = {}
    for pair, prediction in zip(pairs, predictions):
        counts = per_task.setdefault(pair["task"], {"rule": 0, "content": 0, "total": 0})
        counts["rule"] += follows_rule(prediction)
        counts["content"] += without_rule(prediction) == pair["rejected"]
        counts["total"] += 1
    total = max(1, len(pairs))
    return {
        "rule_following": sum(c["rule"] for c in per_task.values()) / total,
        "content_exact_match": sum(c["content"] for c in per_task.values()) / total,
        "exact_match": answered["overall"],
        "per_task": {task: {"rule_following": c["rule"] / c["total"], "content_exact_match": c["content"] / c["total"],
                            "total": c["total"]} for task, c in per_task.items()},
        "predictions": predictions,
    }


def _padded(label: str, width: int) -> str:
    """`label` padded to `width` terminal columns (a CJK character takes two)."""
    return label + " " * (width - len(label) - sum(1 for c in label if ord(c) > 0x2E80))


def _results_table(before: dict, after: dict, accuracy: dict, heldout_count: int) -> list[str]:
    rows = [("preference accuracy", accuracy["reference"]["accuracy"], accuracy["adapter"]["accuracy"]),
            (f"answers ending in {RULE_MARK}", before["rule_following"], after["rule_following"]),
            ("content correct", before["content_exact_match"], after["content_exact_match"])]
    rows += [(f"  {family.name} {family.title}", before["per_task"][family.name]["rule_following"],
              after["per_task"][family.name]["rule_following"]) for family in TASK_FAMILIES]
    lines = [f"held-out: {heldout_count} prompts whose inputs never appear in training; greedy answers",
             f"  {'':<24}{'SFT (before)':>14}{'DPO (after)':>13}"]
    for index, (label, b, a) in enumerate(rows):
        if index == 3:
            lines.append(f"  answers ending in {RULE_MARK}, per task:")
        lines.append(f"  {_padded(label, 24)}{b:>14.0%}{a:>13.0%}")
    lines.append("  (preference accuracy: the SFT run by log-probability, the DPO run by its implicit reward)")
    return lines


def _samples(heldout: Sequence[dict], before: dict, after: dict, count: int = 3) -> list[str]:
    """The first held-out prompt of `count` task families, with both runs' greedy answers."""
    return _sample_chat(heldout, before, after, count, title="sample answers (held-out prompts, greedy):",
                        labels=("SFT", "SFT + DPO"))


# ------------------------------------------------------------------------------------------ the stage
def finished_sft_run(run_dir: Path):
    """The SFT demo's run in `run_dir` (a loraft.rundir.UsableRun) if it finished, else None."""
    from loraft.errors import RunError
    from loraft.run_access import open_run

    try:
        run = open_run(run_dir)
    except RunError:
        return None
    if run.record.get("status") != "finished" or run.config.train.objective != "sft":
        return None
    return run


def sft_run_for_stage(stage: str, workdir: Path, run_sft: Callable, timings: dict, overwrite: bool,
                      home: Optional[Path], seed: int, rebuild_base: bool, log: Callable[[str], None]):
    """The finished SFT demo run in `workdir/run` a later stage (preference, rl) starts from: run first with `run_sft`
    (loraft.demo.run.run_demo) where there is none, its time in timings["sft_demo"]. Returns a UsableRun."""
    from loraft.run_access import open_run

    sft_dir = Path(workdir) / "run"
    sft = finished_sft_run(sft_dir)
    if sft is None:
        log(f"{stage} stage: {sft_dir} holds no finished SFT demo run, so the SFT demo (`loraft demo`) runs first")
        started = time.time()
        run_sft(workdir, overwrite=overwrite, home=home, seed=seed, rebuild_base=rebuild_base, log=log)
        timings["sft_demo"] = time.time() - started
        sft = open_run(sft_dir)
        log("")
    elif rebuild_base:
        log(f"{stage} stage: {sft_dir} is a finished SFT demo run, so its base is used (--rebuild-base ignored)")
    return sft


def run_preference_demo(
    workdir: str | Path = "loraft-demo",
    overwrite: bool = False,
    home: Optional[Path] = None,
    config_path: Optional[Path] = None,
    seed: int = 0,
    rebuild_base: bool = False,
    log: Callable[[str], None] = print,
    train_per_task: int = 200,
    heldout_per_task: int = 40,
    overrides: Sequence[str] = (),
) -> dict:
    """The preference stage: pairs, the SFT run's answers, DPO from the SFT run, the DPO run's answers, a table.

    Where `workdir/run` holds no finished SFT demo run, the SFT demo (run_demo) runs first.

    Args:
        workdir: the SFT demo's workdir; the stage writes `data/preference_*.jsonl`, `preference-run/`,
            `preference-eval/` and `preference_results.json` there.
        overwrite: replace a previous preference run (and an unfinished SFT demo run, where that runs first).
        home, rebuild_base: for the SFT demo, where it runs first (see run_demo).
        config_path: the DPO config (default: configs/demo-preference.yaml); model, adapter_from, data and output
            paths are filled in.
        seed: seed for the generated pairs.
        train_per_task, heldout_per_task, overrides: smaller data and config overrides (key=value) for tests.
    Returns:
        {"before", "after", "preference_accuracy", "run_dir", "timings"}; before/after as rule_following returns.
    """
    from loraft.config import load_config
    from loraft.errors import RunError
    from loraft.evaluate_preference import evaluate_preferences
    from loraft.generate import load_run
    from loraft.run_access import open_run

    workdir = Path(workdir)
    sft_dir, run_dir = workdir / "run", workdir / "preference-run"
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunError(f"{run_dir}: holds a previous preference demo run; pass --overwrite to replace it")
    timings: dict[str, float] = {}
    sft = sft_run_for_stage("preference", workdir, run_demo, timings, overwrite=overwrite, home=home, seed=seed,
                            rebuild_base=rebuild_base, log=log)

    stage_started = time.time()
    train_path, heldout_path = write_preference_data(workdir / "data", seed, train_per_task, heldout_per_task)
    heldout = read_jsonl(heldout_path)
    config = load_config(config_path or PREFERENCE_CONFIG, [
        f"model.name_or_path={sft.config.model.name_or_path}", f"model.adapter_from={sft_dir}",
        f"data.path={train_path}", f"output_dir={run_dir}", "overwrite=true", *overrides,
    ])
    log(f"[1/4] preference data: {len(read_jsonl(train_path))} training and {len(heldout)} held-out pairs -> "
        f"{train_path.parent}; chosen = the correct answer + {RULE_MARK!r} (a rule the SFT data never shows), "
        "rejected = the bare answer SFT taught")

    step_started = time.time()
    model, tokenizer, _, _ = load_run(sft)
    max_new_tokens = max(len(tokenizer(pair["chosen"])["input_ids"]) for pair in heldout) + 4
    before = rule_following(model, tokenizer, heldout, max_new_tokens)
    del model
    timings["eval_before"] = time.time() - step_started
    log(f"[2/4] before: the SFT run {sft_dir}: answers ending in {RULE_MARK} {before['rule_following']:.1%}, "
        f"content correct {before['content_exact_match']:.1%} ({timings['eval_before']:.0f}s)")

    log(f"[3/4] DPO from the SFT run's adapter (the reference: its frozen copy), loss {config.loss_type()}, beta "
        f"{config.preference.beta:g}: "
        f"{config.train.max_steps} steps x {config.train.per_device_train_batch_size} pairs (the plan: train.log)")
    step_started = time.time()
    # loraft's training stage, exactly as `loraft train` runs it
    run_dir = demo_train(config, log, "DPO step")
    timings["dpo"] = time.time() - step_started

    step_started = time.time()
    dpo = open_run(run_dir)
    model, tokenizer, _, _ = load_run(dpo)
    after = rule_following(model, tokenizer, heldout, max_new_tokens)
    del model
    # no retention: the demo's toy base has no general chat to keep (`loraft demo --real` shows retention)
    metrics = evaluate_preferences(dpo, heldout_path, dpo.config.data, workdir / "preference-eval", base=True,
                                   batch_size=50, retention=False)
    accuracy = metrics["preference"]
    timings["eval_after"] = time.time() - step_started
    log(f"[4/4] after: the DPO run: answers ending in {RULE_MARK} {after['rule_following']:.1%}, content correct "
        f"{after['content_exact_match']:.1%}, preference accuracy {accuracy['adapter']['accuracy']:.1%} "
        f"(SFT {accuracy['reference']['accuracy']:.1%}) ({timings['eval_after']:.0f}s)")

    for line in [""] + _results_table(before, after, accuracy, len(heldout)) + [""] + _samples(heldout, before, after):
        log(line)
    timings["stage"] = time.time() - stage_started
    log(f"times: preference stage {timings['stage']:.0f}s (DPO {timings['dpo']:.0f}s, evaluation "
        f"{timings['eval_before'] + timings['eval_after']:.0f}s)"
        + (f"; the SFT demo before it {timings['sft_demo']:.0f}s" if "sft_demo" in timings else ""))
    log(f"run directory: {run_dir}  (try: loraft chat {run_dir})")
    results = {"rule": f"end the answer with {RULE_MARK}", "before": before, "after": after,
               "preference_accuracy": accuracy, "run_dir": str(run_dir), "sft_run_dir": str(sft_dir),
               "timings": timings}
    write_json_atomically(workdir / "preference_results.json", results)
    return {**results, "run_dir": run_dir}
