"""The retention guard measured on the real model (issue 27): a narrow fine-tune of SmolLM2-135M-Instruct (its Q4_1
GGUF, loraft.smollm2) with and without the guard, task exact match and general retention side by side.

    python benchmarks/retention_guard.py off:train.retention=off kl:train.retention=kl
    python benchmarks/retention_guard.py w0.3:train.retention=kl,train.retention_weight=0.3

Each variant NAME:OVERRIDES (comma-separated `loraft train` overrides) trains, in its own process one after the other,
the gguf-lora preset (a user's settings for a GGUF file: r 16 on every linear layer, batch 8 x 2, lr 2e-4, cosine)
on the same 960 records of loraft.demo.format_task (dates as day/month/year, words as [WORD]) for one epoch (60
steps), then reports:
- task exact match (greedy, 16 new tokens) on 600 held-out records whose inputs never appear in training, per task;
- retention (loraft.retention, what `loraft eval RUN` prints): general accuracy of the base and of the run on the
  296 checkable prompts of the 373 general ones, and the mean per-token KL from the base on the base's own answers;
- the training time, the guard's own seconds (metrics.jsonl's retention_seconds) and the one-time targets.
Writes one JSON line per variant to --out (default benchmarks/results/retention_guard.jsonl).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HELDOUT = 600


def run_variant(name: str, overrides: list[str], root: Path) -> dict:
    from loraft.config import load_config
    from loraft.demo.format_task import format_task_records
    from loraft.demo.real import task_exact_match
    from loraft.generate import load_run
    from loraft.presets import preset_path
    from loraft.retention import retention_of_run
    from loraft.smollm2 import smollm2_gguf
    from loraft.train import train

    train_records, heldout = format_task_records(seed=0, train=960, heldout=HELDOUT)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_records), encoding="utf-8")
    out = root / "runs" / name
    config = load_config(preset_path("gguf-lora"), [
        f"model.name_or_path={smollm2_gguf()}", f"data.path={data}", f"output_dir={out}", "overwrite=true",
        "train.logging_steps=5", "train.save_steps=1000", *overrides])
    started = time.time()
    train(config, progress_bar=False)
    train_seconds = time.time() - started
    model, tokenizer, template, info = load_run(out)
    task = task_exact_match(model, tokenizer, template, heldout, info["config"].generation)

    retention = retention_of_run(model, tokenizer, template, info, 16, None)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = (out / "train.log").read_text()
    return {"name": name, "overrides": overrides, "train_seconds": round(train_seconds, 1),
            "train_runtime": next((m["train_runtime"] for m in metrics if "train_runtime" in m and "loss" not in m),
                                  None),
            "guard_seconds": max([m.get("retention_seconds", 0) for m in metrics] or [0]),
            "targets_line": next((line for line in log.splitlines() if "next-token targets" in line), None),
            "task": task["exact_match"], "task_by": task["by_task"],
            "base_accuracy": retention["base_accuracy"], "accuracy": retention["accuracy"],
            "kept": retention["kept"], "kl_per_token": retention["kl_per_token"],
            "by_language": retention["by_language"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="NAME:OVERRIDE,OVERRIDE,...")
    parser.add_argument("--root", default="/tmp/loraft-retention-guard")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "retention_guard.jsonl"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.worker:
        name, _, overrides = args.variants[0].partition(":")
        print(json.dumps(run_variant(name, [o for o in overrides.split(",") if o], root)))
        return
    for variant in args.variants:  # each in its own process, one after the other
        done = subprocess.run([sys.executable, __file__, "--worker", "1", "--root", str(root), variant],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(result))
        with open(args.out, "a", encoding="utf-8") as sink:
            sink.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
