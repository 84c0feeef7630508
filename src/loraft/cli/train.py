"""`loraft train` and `loraft plan`: a config (a YAML file or a shipped preset's name) and its dot-overrides."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

# A run stopped on SIGTERM/SIGINT exits 75 (EX_TEMPFAIL in sysexits.h: "try again later"): it saved a checkpoint and
# is resumable. Unlike 0 a `&&` chain or a job scheduler does not take it for finished; unlike 2 (an error),
# 1 (a bug) or death by a signal (128+N in a shell) it says that nothing was lost since the checkpoint.
STOPPED_EXIT_CODE = 75


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when it runs alone): only rank 0 speaks."""
    return int(os.environ.get("RANK", "0"))


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, or a shipped preset's name (see `loraft config --presets`)")
    parser.add_argument("overrides", nargs="*", help="dot-overrides, e.g. train.max_steps=3 output_dir=out")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")


def cmd_train(args) -> int:
    from loraft.config import load_config
    from loraft.presets import resolve_config_source
    from loraft.train import TrainingStopped, train

    config = load_config(resolve_config_source(args.config), args.overrides)
    try:
        run_dir = train(config, resume=args.resume)
    except TrainingStopped as stopped:
        if rank() == 0:
            command = shlex.join(["loraft", "train", args.config, *args.overrides])
            print(f"stopped at step {stopped.step}; resume with: {command} --resume" if stopped.checkpoint
                  else f"stopped before the first checkpoint; start again with: {command}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    if rank() == 0:
        print(f"run directory: {run_dir}")
    return 0


def plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, or a shipped preset's name")
    parser.add_argument("overrides", nargs="*", help="dot-overrides, e.g. train.precision=fp32")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--measure", action="store_true",
                        help="measure the speed choices now (else: the cached measurement, or the static defaults)")


def cmd_plan(args) -> int:
    from loraft.config import load_config
    from loraft.presets import resolve_config_source
    from loraft.train import preview_plan

    report = preview_plan(load_config(resolve_config_source(args.config), args.overrides), measure=args.measure)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "describe"}, ensure_ascii=False, indent=2))
        return 0
    parameters, memory = report["parameters"], report["memory"]
    print(f"model: {report['model']}")
    print(report["describe"])
    print(f"  {'autotune':19} {report['autotune']}")
    print(f"parameters: {parameters['trainable']:,} trainable of {parameters['total']:,}")
    print(f"peak memory (estimate): {memory['peak_gib']} GiB = " + " + ".join(
        f"{name} {value}" for name, value in memory["parts_gib"].items()))
    return 0
