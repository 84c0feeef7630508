"""The demo's RL stage (`loraft demo --stage rl`): GRPO teaches the SFT demo's run inputs longer than any it saw.

The SFT demo trains each task family on short inputs (upper and numerals 3-7 characters, antonym 2-5). Its run then
fails on longer inputs: it stops where the training inputs stopped ("cibloexlyw" -> "CIBLEXL"). Here every prompt
is one of those instructions; the held-out ones have inputs one to two characters longer (LONGER), never seen in
training, and the training prompts span the SFT lengths and the longer ones, so the reward teaches where to stop too. GRPO
samples grpo.num_generations answers per prompt from the SFT run's adapter and rewards them with the built-in
exact_match against the record's `answer`, plus a graded `function` reward, place_accuracy (the share of the answer's
characters written in their place), so that an answer that gets further right scores more even when none of a
group is exact. Before is the SFT run, after the GRPO run, both greedy: exact match on held-out long inputs that
never appear in training (the SFT demo's hash split), and on the SFT demo's own held-out prompts (what the run
keeps of what SFT taught). The word tasks (spell, translate) are left out: there the same reward made the run repeat
words (measured: README).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from loraft.demo.preference import _padded, sft_run_for_stage
from loraft.demo.run import _sample_chat, demo_train, exact_match, run_demo
from loraft.demo.tasks import (ANTONYMS, LETTERS, TASK_FAMILIES, TASKS, _random_string, _write_jsonl,
                               is_heldout_input, read_jsonl, write_demo_data)
from loraft.files import write_json_atomically

RL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-rl.yaml"  # package data
# per task family: the alphabet, the long input lengths (past the SFT demo's longest: 7, 7, 5) the held-out prompts
# have, and the shortest length of the training prompts, which span the SFT lengths too, so the reward also teaches
# where to stop
LONGER = {
    "upper": (LETTERS, 8, 9, 3),
    "numerals": ("0123456789", 8, 9, 3),
    "antonym": ("".join(sorted(ANTONYMS)), 6, 7, 2),
}


def place_accuracy(completions, answer, **columns) -> list[float]:
    """A graded reward (the demo's `function` reward, beside exact_match): the share of the answer's units the
    completion writes in their place, over the longer of the two, where a unit is a word for an answer of words
    (spell, translate) and a character otherwise; so an answer that keeps going right past the lengths the SFT data
    showed scores more than one that stops there."""
    scores = []
    for completion, expected in zip(completions, answer):
        want = str(expected).strip()
        got = completion.split() if " " in want else list(completion.strip())
        want_units = want.split() if " " in want else list(want)
        scores.append(sum(a == b for a, b in zip(got, want_units)) / max(len(got), len(want_units), 1))
    return scores


def make_rl_records(seed: int = 0, train_per_task: int = 200, heldout_per_task: int = 40,
                    tasks: Sequence[str] = tuple(LONGER)) -> tuple[list[dict], list[dict]]:
    """Prompt records {"instruction", "input", "answer", "task"} for each task of `tasks`: training inputs of every
    length from LONGER's shortest to its longest, held-out ones only of its long lengths.

    Returns:
        (train, heldout); the held-out inputs are disjoint from the training inputs (tasks.is_heldout_input).
    """
    rng = random.Random(f"rl-{seed}")
    train: list[dict] = []
    heldout: list[dict] = []
    for name in tasks:
        family = TASKS[name]
        alphabet, low, high, shortest = LONGER[name]
        for split, count, wanted, make in ((train, train_per_task, False, _random_string(alphabet, shortest, high)),
                                           (heldout, heldout_per_task, True, _random_string(alphabet, low, high))):
            seen: set[str] = set()
            for _ in range(count * 1000):
                if sum(r["task"] == name for r in split) == count:
                    break
                text = make(rng)
                if is_heldout_input(text) != wanted or text in seen:
                    continue
                seen.add(text)
                split.append({"instruction": rng.choice(family.instructions), "input": text,
                              "answer": family.answer(text), "task": name})
    rng.shuffle(train)
    return train, heldout


def write_rl_data(out_dir: Path, seed: int = 0, train_per_task: int = 200, heldout_per_task: int = 40,
                  tasks: Sequence[str] = tuple(LONGER)) -> tuple[Path, Path]:
    """Write the prompts as `rl_train.jsonl` and `rl_heldout.jsonl` under out_dir: (train_path, heldout_path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = make_rl_records(seed, train_per_task, heldout_per_task, tasks)
    train_path, heldout_path = out_dir / "rl_train.jsonl", out_dir / "rl_heldout.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(heldout_path, heldout)
    return train_path, heldout_path


def _results_table(before: dict, after: dict, kept: dict, heldout_count: int, tasks: Sequence[str]) -> list[str]:
    lines = [f"held-out exact match, greedy: {heldout_count} prompts with inputs longer than any the SFT run trained on "
             "(never in training)", f"  {'task':<24}{'SFT (before)':>14}{'GRPO (after)':>14}"]
    for family in TASK_FAMILIES:
        if family.name in tasks:
            b, a = before["per_task"][family.name], after["per_task"][family.name]
            lines.append(f"  {_padded(f'{family.name} {family.title}', 24)}{b['accuracy']:>14.0%}"
                         f"{a['accuracy']:>14.0%}   ({a['correct']}/{a['total']})")
    lines.append(f"  {'overall':<24}{before['overall']:>14.0%}{after['overall']:>14.0%}")
    lines.append(f"  {'trained lengths':<24}{kept['before']['overall']:>14.0%}{kept['after']['overall']:>14.0%}"
                 f"   ({sum(c['correct'] for c in kept['after']['per_task'].values())}/"
                 f"{sum(c['total'] for c in kept['after']['per_task'].values())})")
    lines.append("  (trained lengths: the SFT demo's own held-out prompts of these tasks, what the run keeps)")
    return lines


def run_rl_demo(
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
    tasks: Sequence[str] = tuple(LONGER),
) -> dict:
    """The RL stage: long-input prompts, the SFT run's answers, GRPO from the SFT run, the GRPO run's answers.

    Where `workdir/run` holds no finished SFT demo run, the SFT demo (run_demo) runs first.

    Args:
        workdir: the SFT demo's workdir; the stage writes `data/rl_*.jsonl`, `rl-run/` and `rl_results.json` there.
        overwrite: replace a previous RL run (and an unfinished SFT demo run, where that runs first).
        config_path: the GRPO config (default: configs/demo-rl.yaml); model, adapter_from, data and output paths are
            filled in.
        train_per_task, heldout_per_task, overrides, tasks: smaller data, config overrides (key=value) and fewer
            task families, for tests.
    Returns:
        {"before", "after", "run_dir", "timings"}; before/after as demo.run.exact_match returns.
    """
    from loraft.config import load_config
    from loraft.errors import RunError
    from loraft.generate import load_run
    from loraft.run_access import open_run

    workdir = Path(workdir)
    sft_dir, run_dir = workdir / "run", workdir / "rl-run"
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunError(f"{run_dir}: holds a previous RL demo run; pass --overwrite to replace it")
    tasks = tuple(tasks)
    timings: dict[str, float] = {}
    sft = sft_run_for_stage("rl", workdir, run_demo, timings, overwrite=overwrite, home=home, seed=seed,
                            rebuild_base=rebuild_base, log=log)

    stage_started = time.time()
    train_path, heldout_path = write_rl_data(workdir / "data", seed, train_per_task, heldout_per_task, tasks)
    config = load_config(config_path or RL_CONFIG, [
        f"model.name_or_path={sft.config.model.name_or_path}", f"model.adapter_from={sft_dir}",
        f"data.path={train_path}", f"output_dir={run_dir}", "overwrite=true", *overrides])
    heldout = [{**record, "output": record["answer"]} for record in read_jsonl(heldout_path)]
    # the SFT demo's own held-out prompts of these tasks (its data, written again: the same seed gives the same file)
    sft_heldout = [r for r in read_jsonl(write_demo_data(workdir / "data", seed)[1]) if r["task"] in tasks]
    sft_heldout = sft_heldout[:heldout_per_task * len(tasks)]
    log(f"[1/4] RL prompts: {len(read_jsonl(train_path))} training and {len(heldout)} held-out -> "
        f"{train_path.parent}; the SFT tasks with longer inputs ("
        + ", ".join(f"{name} {LONGER[name][1]}-{LONGER[name][2]}" for name in tasks) + " characters held out; the "
        "training prompts span the SFT lengths too)")

    step_started = time.time()
    model, tokenizer, _, _ = load_run(sft)
    max_new_tokens = max(len(tokenizer(r["answer"])["input_ids"]) for r in heldout) + 4
    before = exact_match(model, tokenizer, heldout, max_new_tokens)
    kept = {"before": exact_match(model, tokenizer, sft_heldout, max_new_tokens)}
    del model
    timings["eval_before"] = time.time() - step_started
    log(f"[2/4] before: the SFT run {sft_dir}: exact match {before['overall']:.1%} on the long inputs, "
        f"{kept['before']['overall']:.1%} on its own held-out prompts ({timings['eval_before']:.0f}s)")

    grpo = config.grpo
    prompts = config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps // grpo.num_generations
    log(f"[3/4] GRPO from the SFT run's adapter: {config.train.max_steps} steps x {prompts} prompts x "
        f"{grpo.num_generations} sampled answers (<= {grpo.max_completion_length} tokens, T {grpo.temperature:g}), "
        "reward: " + ", ".join(f"{r.label} x {r.weight:g}" for r in grpo.rewards) + " (the plan: train.log)")
    step_started = time.time()
    run_dir = demo_train(config, log, "GRPO step")
    timings["grpo"] = time.time() - step_started

    step_started = time.time()
    model, tokenizer, _, _ = load_run(open_run(run_dir))
    after = exact_match(model, tokenizer, heldout, max_new_tokens)
    kept["after"] = exact_match(model, tokenizer, sft_heldout, max_new_tokens)
    del model
    timings["eval_after"] = time.time() - step_started
    log(f"[4/4] after: the GRPO run: exact match {after['overall']:.1%} on the long inputs, "
        f"{kept['after']['overall']:.1%} on the SFT demo's held-out prompts ({timings['eval_after']:.0f}s)")

    for line in ([""] + _results_table(before, after, kept, len(heldout), tasks) + [""]
                 + _sample_chat(heldout, before, after, 3, title="sample answers (held-out long inputs, greedy):",
                                labels=("SFT", "SFT + GRPO"))):
        log(line)
    timings["stage"] = time.time() - stage_started
    log(f"times: rl stage {timings['stage']:.0f}s (GRPO {timings['grpo']:.0f}s, evaluation "
        f"{timings['eval_before'] + timings['eval_after']:.0f}s)"
        + (f"; the SFT demo before it {timings['sft_demo']:.0f}s" if "sft_demo" in timings else ""))
    log(f"run directory: {run_dir}  (sampled completions: {run_dir / 'completions.jsonl'}; try: loraft chat {run_dir})")
    results = {"task": "the SFT tasks with longer inputs", "before": before, "after": after,
               "sft_heldout": kept, "run_dir": str(run_dir),
               "sft_run_dir": str(sft_dir), "timings": timings}
    write_json_atomically(workdir / "rl_results.json", results)
    return {**results, "run_dir": run_dir}

