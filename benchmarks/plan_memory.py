"""`loraft plan`'s peak-memory estimate against the measured peak RSS of the same training, in one run.

    python benchmarks/plan_memory.py                        # the demo's fine-tune (20 steps)

At the bloom-1b4-zh shape the measured side is train_speed.py's peak RSS of the same run (docs/benchmarks.md).

Each training runs in its own process (`loraft train`, what a user runs), so its peak RSS (ru_maxrss of the
child) is its own; the estimate is `loraft plan --json` for the same config and overrides on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _demo_config(root: Path) -> tuple[str, list[str]]:
    from loraft.demo import BaseRecipe, build_demo_base, write_demo_data

    # the demo's base at its real shape; pretraining steps do not change memory, so a few suffice here
    base = build_demo_base(root / "home", recipe=BaseRecipe(steps=4, warmup_steps=1), log=lambda line: None)
    train_path, _ = write_demo_data(root / "data")
    return "demo", [f"model.name_or_path={base}", f"data.path={train_path}", "train.max_steps=20"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    root = common.CACHE / "runs" / f"plan-memory-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    preset, overrides = _demo_config(root)
    overrides += [f"output_dir={root / 'run'}", "overwrite=true", *args.override]
    loraft = [sys.executable, "-m", "loraft.cli"]
    estimate = json.loads(subprocess.run([*loraft, "plan", preset, *overrides, "--json"], check=True,
                                         capture_output=True, text=True, env=os.environ).stdout)
    started = time.perf_counter()
    subprocess.run([*loraft, "train", preset, *overrides], check=True, env=os.environ,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    measured = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB -> GiB (Linux)
    plan = estimate["plan"]
    print(f"{'demo'}: precision {plan['precision']}, sub-batches {plan['micro_batch_tokens']}, "
          f"fused loss {plan['fused_loss']}; train {seconds:.0f} s")
    print("| shape | estimate GiB | measured peak RSS GiB | estimate / measured | parts of the estimate |")
    print("|---|---:|---:|---:|---|")
    parts = ", ".join(f"{name} {value}" for name, value in estimate["memory"]["parts_gib"].items())
    print(f"| {'demo'} | {estimate['memory']['peak_gib']:.2f} | {measured:.2f} | "
          f"{estimate['memory']['peak_gib'] / measured:.2f} | {parts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
