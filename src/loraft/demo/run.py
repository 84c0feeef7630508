"""The demo run: data, held-out exact match of the base, the LoRA fine-tune through `loraft.train`, exact match
after, a results table and a short chat."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from transformers import TrainerCallback

from loraft.demo.base import STAMP_FILE, Progress, build_demo_base
from loraft.demo.llama import llama_cpp_step
from loraft.demo.tasks import TASK_FAMILIES, TASKS, read_jsonl, write_demo_data
from loraft.files import write_json_atomically

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"  # package data: wheels ship it


# ---------------------------------------------------------------------------------------- evaluation
def _conversation(record: dict) -> list[dict]:
    """The user turn of an alpaca record, joined as the reference does: instruction + "\\n" + input."""
    return [{"role": "user", "content": "\n".join([record["instruction"], record.get("input") or ""])}]


def exact_match(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 32, batch_size: int = 100) -> dict:
    """Held-out exact match: greedy answers with the human_assistant prompt vs the reference outputs.

    Prompts are encoded and left-padded by loraft.generate.generate_batch, exactly as `loraft generate` does.

    Returns:
        {"overall": accuracy, "per_task": {task: {"correct", "total", "accuracy"}}, "predictions": [str]}.
    """
    from loraft.config import GenerationConfig
    from loraft.generate import generate_batch
    from loraft.templates import get_template

    settings = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    template = get_template("human_assistant")
    predictions = generate_batch(model, tokenizer, template, [_conversation(r) for r in records], settings, batch_size)
    per_task: dict[str, dict] = {}
    for record, prediction in zip(records, predictions):
        counts = per_task.setdefault(record.get("task", "all"), {"correct": 0, "total": 0})
        counts["total"] += 1
        counts["correct"] += int(prediction.strip() == record["output"].strip())
    for counts in per_task.values():
        counts["accuracy"] = counts["correct"] / counts["total"]
    correct = sum(c["correct"] for c in per_task.values())
    return {"overall": correct / max(1, len(records)), "per_task": per_task, "predictions": predictions}


# ------------------------------------------------------------------------------------------- the demo
def _answer_tokens(tokenizer, records: Sequence[dict]) -> int:
    return max(len(tokenizer(r["output"])["input_ids"]) for r in records)


def _results_table(before: dict, after: dict, heldout_count: int) -> list[str]:
    lines = [
        f"held-out exact match: {heldout_count} prompts whose inputs never appear in training; greedy decoding",
        f"  {'task':<22}{'before':>8}{'after':>8}",
    ]
    for family in TASK_FAMILIES:
        b, a = before["per_task"][family.name], after["per_task"][family.name]
        label = f"{family.name} {family.title}"
        # CJK characters take two columns in a terminal.
        pad = 22 - len(label) - sum(1 for c in family.title if ord(c) > 0x2E80)
        lines.append(f"  {label}{' ' * pad}{b['accuracy']:>8.0%}{a['accuracy']:>8.0%}   ({a['correct']}/{a['total']})")
    lines.append(f"  {'overall':<22}{before['overall']:>8.0%}{after['overall']:>8.0%}")
    return lines


def _sample_chat(heldout: Sequence[dict], before: dict, after: dict, count: int = 3,
                 title: str = "sample chat (held-out prompts, greedy):",
                 labels: tuple[str, str] = ("base", "base + LoRA")) -> list[str]:
    """The first held-out prompt of `count` different task families, with both models' answers."""
    lines = [title]
    width = max(map(len, labels))
    shown: set[str] = set()
    for index, record in enumerate(heldout):
        if record["task"] in shown or len(shown) == count:
            continue
        shown.add(record["task"])
        lines.append(f"  Human: {record['instruction']}")
        lines.append(f"         {record['input']}")
        for label, result in zip(labels, (before, after)):
            lines.append(f"  Assistant ({label}):{' ' * (width - len(label) + 1)}{result['predictions'][index].strip()!r}")
        lines.append("")
    return lines


def demo_train(config, log: Callable[[str], None], label: str = "fine-tune step") -> Path:
    """`loraft train` for a demo stage: its progress as FineTuneProgress lines; its INFO lines (the plan, the target
    list, the data report) go to the run's train.log only, not to the console the demo prints to."""
    from loraft.train import train

    def console(record: logging.LogRecord) -> bool:
        return not (record.name.startswith("loraft") and record.levelno < logging.WARNING)

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(console)
    try:
        return train(config, callbacks=[FineTuneProgress(config.train.max_steps, log, label)], progress_bar=False)
    finally:
        for handler in handlers:
            handler.removeFilter(console)


class FineTuneProgress(TrainerCallback):
    """A TrainerCallback that prints the fine-tune's Progress lines (step, latest logged loss, ETA)."""

    def __init__(self, total_steps: int, log: Callable[[str], None], label: str = "fine-tune step"):
        self.progress = Progress(label, total_steps, log)
        self.loss = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(state.global_step, f"loss {self.loss:.3f}" if self.loss is not None else "")


def run_demo(
    workdir: str | Path = "loraft-demo",
    overwrite: bool = False,
    home: Optional[Path] = None,
    config_path: Optional[Path] = None,
    seed: int = 0,
    rebuild_base: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole demo: base, data, before, LoRA fine-tune, after, table and a short chat.

    Args:
        workdir: where the demo writes its data (`data/`), run directory (`run/`) and `demo_results.json`.
        overwrite: replace a previous demo run in workdir.
        home: cache root for a rebuilt base (default: loraft.files.cache_home(), $LORAFT_HOME or ~/.cache/loraft).
        config_path: the run config (default: configs/demo.yaml); model, data and output paths are filled in.
        seed: seed for the generated instruction set.
        rebuild_base: pretrain the base anew (into the cache under `home`) instead of using the shipped one.
    Returns:
        {"before", "after", "run_dir", "timings"}; before/after as returned by exact_match.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraft.config import load_config
    from loraft.errors import RunError
    from loraft.precision import resolve_device

    workdir = Path(workdir)
    run_dir = workdir / "run"
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunError(f"{run_dir}: holds a previous demo run; pass --overwrite to replace it")
    timings: dict[str, float] = {}
    started = time.time()
    log("[1/6] base model")
    base_dir = build_demo_base(home, force=rebuild_base, log=log)
    timings["base"] = time.time() - started
    skills = json.loads((base_dir / STAMP_FILE).read_text(encoding="utf-8")).get("raw_form_accuracy") or {}
    log("  the base's skills asked in their pretraining form (e.g. \"小写：abc\\n大写：\"), held-out inputs: "
        + ", ".join(f"{task} {accuracy:.0%}" for task, accuracy in skills.items()))

    demo_started = time.time()
    train_path, heldout_path = write_demo_data(workdir / "data", seed=seed)
    heldout = read_jsonl(heldout_path)
    config = load_config(config_path or DEFAULT_CONFIG, [
        f"model.name_or_path={base_dir}", f"data.path={train_path}", f"output_dir={run_dir}", "overwrite=true",
    ])
    log(f"[2/6] data: {len(read_jsonl(train_path))} training and {len(heldout)} held-out records, "
        f"{len(TASK_FAMILIES)} task families ({', '.join(TASKS)}) -> {train_path.parent}")

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    max_new_tokens = _answer_tokens(tokenizer, heldout) + 4
    device = resolve_device(config.model.device)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device).eval()
    step_started = time.time()
    before = exact_match(base, tokenizer, heldout, max_new_tokens)
    timings["eval_before"] = time.time() - step_started
    log(f"[3/6] before: the base model, same prompts: exact match {before['overall']:.1%} "
        f"({timings['eval_before']:.0f}s)")

    log(f"[4/6] LoRA fine-tune: r={config.adapter.r} on {config.adapter.target_modules}, "
        f"{config.train.max_steps} steps x {config.train.per_device_train_batch_size} samples on {device.type} "
        "(the plan: train.log)")
    step_started = time.time()
    # loraft's training stage, exactly as `loraft train` runs it
    run_dir = demo_train(config, log)
    timings["finetune"] = time.time() - step_started

    tuned = PeftModel.from_pretrained(base, run_dir).eval()
    step_started = time.time()
    after = exact_match(tuned, tokenizer, heldout, max_new_tokens)
    timings["eval_after"] = time.time() - step_started
    log(f"[5/6] after: base + LoRA adapter: exact match {after['overall']:.1%} ({timings['eval_after']:.0f}s)")

    lines = [""] + _results_table(before, after, len(heldout)) + [""] + _sample_chat(heldout, before, after)
    for line in lines:
        log(line)
    # the same run in llama.cpp: exported to GGUF, verified, asked the first held-out prompt
    step_started = time.time()
    llama = llama_cpp_step(run_dir, workdir / "gguf", _conversation(heldout[0]), after["predictions"][0], log)
    timings["gguf"] = time.time() - step_started
    log(f"times: base {timings['base']:.0f}s, demo {time.time() - demo_started:.0f}s (fine-tune "
        f"{timings['finetune']:.0f}s, evaluation {timings['eval_before'] + timings['eval_after']:.0f}s, GGUF export "
        f"and llama.cpp {timings['gguf']:.0f}s)")
    log(f"run directory: {run_dir}  (try: loraft chat {run_dir})")
    timings["demo"] = time.time() - demo_started
    results = {"before": before, "after": after, "run_dir": str(run_dir), "timings": timings, "base_dir": str(base_dir),
               "llama_cpp": None if llama is None else {
                   "answer": llama["llama_cpp_answer"], "verify": llama["report"]["verify"]}}
    write_json_atomically(workdir / "demo_results.json", results)
    return {**results, "run_dir": run_dir}
