"""Two checks behind docs/benchmarks.md's notes on the SFT step (issue 27), on SmolLM2-135M-Instruct's GGUF:

    python benchmarks/guard_step_costs.py                 # peak RSS with the guard and without, at 4 and 16 steps
    python benchmarks/guard_step_costs.py --dropout       # LoRA dropout's mask against its matmul, one activation
    python benchmarks/guard_step_costs.py --dropout-steps 16  # whole steps: nn.Dropout, loraft's masks, no dropout

1. Peak RSS: `loraft train gguf-lora` on the narrow format task (loraft.demo.format_task), train.retention=off and
   train.retention=kl (every step), each run in its own process (its ru_maxrss is its own), at each --steps.
2. --dropout: median milliseconds of nn.Dropout(0.05) on a 1024 x 1536 bf16 activation (SmolLM2's MLP width),
   of the matmul that activation feeds (to 576 columns), and of loraft.fastpaths.dropout.LoraDropout(0.05), which
   the plan puts in nn.Dropout's place on a CPU: where a step's dropout time goes.

Where a whole step goes was read with py-spy (not a loraft dependency):
    py-spy record -r 50 -f raw --native -o prof.txt -- python benchmarks/guard_step_costs.py --worker off 16
and the samples under `dropout (torch/nn/functional.py` counted against those under `training_step`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(retention: str, steps: int, dropout: str = "fast") -> dict:
    """One `loraft train gguf-lora` run; dropout: fast (the plan's LoraDropout), nn (peft's nn.Dropout kept: the
    plan's replacement skipped), none (adapter.dropout=0)."""
    import loraft.model
    from loraft.config import load_config
    from loraft.demo.format_task import format_task_records
    from loraft.presets import preset_path
    from loraft.smollm2 import smollm2_gguf
    from loraft.train import train

    records, _ = format_task_records(seed=0, train=16 * steps, heldout=4)
    root = Path(tempfile.mkdtemp())
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = load_config(preset_path("gguf-lora"), [
        f"model.name_or_path={smollm2_gguf()}", f"data.path={root / 'train.jsonl'}", f"output_dir={root / 'run'}",
        f"train.max_steps={steps}", "train.save_steps=1000", "train.logging_steps=1", f"train.retention={retention}",
        "train.retention_every=1", *(["adapter.dropout=0"] if dropout == "none" else [])])
    if dropout == "nn":
        loraft.model.use_fast_dropout = lambda model: 0
    run_dir = train(config, progress_bar=False)
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    step_s = [b - a for a, b in zip(times, times[1:])]
    return {"retention": retention, "steps": steps, "dropout": dropout,
            "median_step_s": round(statistics.median(step_s), 4) if step_s else None,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def dropout_costs(repeats: int = 20) -> dict:
    import torch

    from loraft.fastpaths.dropout import LoraDropout

    torch.manual_seed(0)
    x = torch.randn(1024, 1536, dtype=torch.bfloat16)
    weight = torch.randn(1536, 576, dtype=torch.bfloat16)
    dropout = torch.nn.Dropout(0.05).train()
    fast = LoraDropout(0.05).train()  # what the plan puts in place of peft's nn.Dropout on a CPU

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return round(statistics.median(times), 2)

    return {"threads": torch.get_num_threads(), "nn_dropout_ms": median_ms(lambda: dropout(x)),
            "matmul_ms": median_ms(lambda: x @ weight), "lora_dropout_ms": median_ms(lambda: fast(x))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="4,16", help="comma-separated step counts (default 4,16)")
    parser.add_argument("--dropout", action="store_true", help="the dropout micro-benchmark only")
    parser.add_argument("--dropout-steps", type=int, metavar="STEPS",
                        help="whole steps with LoRA dropout three ways (nn.Dropout, loraft's masks, none), guard off, "
                        "each in its own process, twice in alternation: median s/step")
    parser.add_argument("--worker", nargs=3, metavar=("RETENTION", "STEPS", "DROPOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.worker[2])))
        return 0
    if args.dropout_steps:
        for _ in range(2):
            for dropout in ("nn", "fast", "none"):
                done = subprocess.run([sys.executable, __file__, "--worker", "off", str(args.dropout_steps), dropout],
                                      capture_output=True, text=True, check=True)
                print(done.stdout.strip().splitlines()[-1], flush=True)
        return 0
    if args.dropout:
        print(json.dumps(dropout_costs()))
        return 0
    for steps in (int(s) for s in args.steps.split(",")):
        for retention in ("off", "kl"):
            done = subprocess.run([sys.executable, __file__, "--worker", retention, str(steps), "fast"],
                                  capture_output=True, text=True, check=True)
            print(done.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
