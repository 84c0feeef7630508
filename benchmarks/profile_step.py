"""Where one optimizer step's time goes: torch.profiler over `loraft train`'s second step at a real shape.

    python benchmarks/profile_step.py --shape bloom-1b4-zh            # loraft's plan on this machine
    python benchmarks/profile_step.py --shape bloom-1b4-zh --override train.micro_batch_tokens=0

Trains two optimizer steps on the same random-weight model and alpaca-zh-like samples as train_speed.py (the
first step warms up), profiles the second, and prints the operators grouped by what they do (matmuls, attention,
elementwise, the loss, the embedding, the optimizer), with the plan the run used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GROUPS = (  # first match wins; operator names as torch.profiler reports them
    ("matmul (linear layers, forward and backward)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                                      "aten::matmul", "aten::linear")),
    ("attention (SDPA / eager scores)", ("scaled_dot_product", "attention", "aten::softmax", "aten::_softmax",
                                         "baddbmm")),
    ("loss (lm_head + cross-entropy)", ("cross_entropy", "log_softmax", "nll_loss", "_LinearCrossEntropy")),
    ("embedding", ("embedding",)),
    ("optimizer (AdamW)", ("adam", "Optimizer.step", "_foreach", "_fused_adam")),
    ("norms", ("layer_norm", "native_layer_norm")),
    ("elementwise (GELU, adds, casts, copies)", ("gelu", "aten::add", "aten::mul", "aten::copy_", "aten::to",
                                                 "aten::_to_copy", "aten::tanh", "aten::div", "aten::sum",
                                                 "aten::fill_", "aten::zero_", "aten::cat", "aten::where")),
)


class ProfileSecondStep(TrainerCallback):
    """Profiles the second optimizer step (the first warms up) into `holder`."""

    def __init__(self, holder: dict):
        self.holder = holder

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.holder["profiler"] = profile(activities=[ProfilerActivity.CPU])
            self.holder["profiler"].__enter__()
            self.holder["started"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if "profiler" in self.holder and "seconds" not in self.holder:
            self.holder["seconds"] = time.perf_counter() - self.holder["started"]
            self.holder["profiler"].__exit__(None, None, None)


def _group(name: str) -> str:
    lowered = name.lower()
    for label, keys in GROUPS:
        if any(key.lower() in lowered for key in keys):
            return label
    return "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="bloom-1b4-zh")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the grouped times here")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset

    from loraft.config import load_config
    from loraft.train import train

    shape = common.SHAPES[args.shape]
    model_dir = common.ensure_model_dir(shape)
    root = common.CACHE / "runs" / f"profile-{shape.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    samples = common.make_samples(16, shape, seed=0)
    data_dir = root / "data"
    Dataset.from_list([{**s, "length": len(s["input_ids"])} for s in samples]).save_to_disk(str(data_dir))
    holder: dict = {}
    from types import SimpleNamespace

    from datasets import load_from_disk

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "bloom-1b4-zh-lora.yaml", [
        f"model.name_or_path={model_dir}", f"output_dir={root / 'run'}", "overwrite=true", "train.max_steps=2",
        "train.logging_steps=1", "train.save_steps=100000", *args.override])
    prepared = SimpleNamespace(train=load_from_disk(str(data_dir)), eval=None, report={"source": "profile"})
    run_dir = train(config, callbacks=[ProfileSecondStep(holder)], prepared=prepared, progress_bar=False)
    plan = json.loads((run_dir / "loraft_run.json").read_text())["plan"]

    totals: dict[str, float] = defaultdict(float)
    for event in holder["profiler"].key_averages():
        totals[_group(event.key)] += event.self_cpu_time_total / 1e6
    profiled = sum(totals.values())
    print(f"shape {shape.name}; plan: precision {plan['precision']}, sub-batches {plan['micro_batch_tokens']}, "
          f"attention {'patch' if plan['attention_patch'] else plan['attention'] or 'default'}, fused loss "
          f"{plan['fused_loss']}, optimizer {plan['optimizer']}; torch threads {torch.get_num_threads()}")
    print(f"step 2: {holder['seconds']:.1f} s wall, {profiled:.1f} s of operator self time\n")
    print("| what | seconds | share |\n|---|---:|---:|")
    for label, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {label} | {seconds:.2f} | {seconds / profiled:.0%} |")
    top = sorted(holder["profiler"].key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("\ntop operators by self time:")
    for event in top:
        print(f"  {event.key:48} {event.self_cpu_time_total / 1e6:8.2f} s  x{event.count}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan, "step_seconds": holder["seconds"],
                                               "groups": totals}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
