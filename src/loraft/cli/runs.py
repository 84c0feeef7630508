"""The commands around runs as processes: `loraft runs` (what is in a directory, live or not), `stop` (a graceful
stop), `ui` (the workflow in a browser) and `demo` (an offline run start to end)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from loraft.cli.train import STOPPED_EXIT_CODE
from loraft.errors import require


def runs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default=".", help="where to look: a run, or runs one or two levels below "
                        "(default: .)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def cmd_runs(args) -> int:
    from pathlib import Path

    from loraft.liveness import find_runs, run_state

    root = Path(args.dir)
    states = []
    for run_dir in find_runs(root):
        state = run_state(run_dir)
        state["name"] = run_dir.name if run_dir == root else str(run_dir.relative_to(root))
        states.append(state)
    if args.json:
        print(json.dumps(states, ensure_ascii=False, indent=2))
        return 0
    if not states:
        print(f"no loraft runs in {root} or two levels below it", file=sys.stderr)
        return 0
    width = max(len("NAME"), *(len(state["name"]) for state in states))
    print(f"{'NAME':{width}}  {'STATUS':11}  {'STEP':>11}  {'LOSS':>8}  STARTED")
    for state in states:
        step = "-" if state["step"] is None else str(state["step"])
        if state["total_steps"]:
            step += f"/{state['total_steps']}"
        loss = "-" if state["loss"] is None else f"{state['loss']:.4f}"
        started = (state["started_at"] or "-")[:19].replace("T", " ")
        print(f"{state['name']:{width}}  {state['status'] or '-':11}  {step:>11}  {loss:>8}  {started}")
    return 0


def stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the run to end (default: 120)")


def cmd_stop(args) -> int:
    from pathlib import Path

    from loraft.liveness import stop_run
    from loraft.rundir import RunDir

    state = stop_run(args.run_dir, timeout=args.timeout)
    run_dir, status = Path(args.run_dir), state["status"]
    if status == "stopped":
        print(f"{run_dir}: stopped at step {state['step']}; resume with: loraft train {RunDir(run_dir).config_file} "
              "--resume")
    elif status == "finished":
        print(f"{run_dir}: finished (the stop came during its final save)")
    else:
        checkpoint = f"; its newest checkpoint is {state['checkpoint']}" if state["checkpoint"] else ""
        print(f"{run_dir}: ended {status} at step {state['step']}{checkpoint}")
    return 0 if status in ("stopped", "finished") else 1


def ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=".", help="the folder whose runs the UI shows and starts (default: .)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1; any other needs --token)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--token", help="require the header 'X-Loraft-Token: T' (default: $LORAFT_UI_TOKEN, else none)")
    parser.add_argument("--allowed-hosts", nargs="*", default=(), metavar="NAME",
                        help="Host names answered besides the bound address ('*': any)")
    parser.add_argument("--allow-hub", action="store_true",
                        help="let a model or data name that is no file in the workspace be a hub id (downloads)")
    parser.add_argument("--time-limit", type=float, default=120.0, metavar="S",
                        help="seconds one plan, data check, preview or config check may take (default: 120)")
    parser.add_argument("--max-runs", type=int, default=4, metavar="N",
                        help="runs starting or running at once (default: 4; 0: the UI starts none)")
    parser.add_argument("--max-jobs", type=int, default=4, metavar="N",
                        help="eval, merge and export jobs running at once (default: 4)")
    parser.add_argument("--max-streams", type=int, default=64, metavar="N",
                        help="live-curve event streams open at once (default: 64)")
    parser.add_argument("--max-chat-loads", type=int, default=2, metavar="N",
                        help="chat models loading at once (default: 2)")
    parser.add_argument("--no-kernel-confinement", action="store_true",
                        help="do not ask the kernel (Landlock) to confine the UI and its runs to the workspace and "
                             "caches; paths are still checked before use")


def cmd_ui(args) -> int:
    require("ui", "serve", "fastapi", "uvicorn")
    from loraft.ui.start import serve_ui

    serve_ui(args.workspace, host=args.host, port=args.port, token=args.token or os.environ.get("LORAFT_UI_TOKEN"),
             allowed_hosts=args.allowed_hosts, kernel_confinement=not args.no_kernel_confinement,
             allow_hub=args.allow_hub, time_limit=args.time_limit, max_runs=args.max_runs, max_jobs=args.max_jobs,
             max_streams=args.max_streams, max_chat_loads=args.max_chat_loads)
    return 0


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="loraft-demo", help="where the demo writes data and its run")
    parser.add_argument("--stage", choices=("sft", "preference", "rl"), default="sft",
                        help="sft: the LoRA fine-tune (run/); preference: DPO on generated pairs from the sft stage's "
                        "run (preference-run/); rl: GRPO on longer inputs from the sft stage's run, rewarded for the "
                        "exact answer (rl-run/); both run the sft stage first where workdir has no finished one")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous demo run of this stage in workdir")
    parser.add_argument("--rebuild-base", action="store_true",
                        help="pretrain the demo's base model anew (cached) instead of using the one shipped with "
                        "loraft")
    parser.add_argument("--model", metavar="PATH.gguf",
                        help="the real-model demo on this GGUF chat model: a narrow fine-tune with the retention "
                        "guard and without it, task and general accuracy side by side, the adapter in llama.cpp "
                        "(real/ in workdir)")
    parser.add_argument("--real", action="store_true",
                        help="the real-model demo on SmolLM2-135M-Instruct (a 98 MB Q4_1 GGUF, fetched once)")


def cmd_demo(args) -> int:
    from loraft.demo import run_demo, run_preference_demo, run_rl_demo
    from loraft.train import TrainingStopped

    stage = {"sft": run_demo, "preference": run_preference_demo, "rl": run_rl_demo}[args.stage]
    try:
        if args.real or args.model:
            if args.stage != "sft" or args.rebuild_base:
                print("loraft demo: --real/--model is a stage of its own (no --stage, no --rebuild-base)",
                      file=sys.stderr)
                return 2
            from loraft.demo.real import run_real_demo

            run_real_demo(model=args.model, workdir=args.workdir, overwrite=args.overwrite)
        else:
            stage(workdir=args.workdir, overwrite=args.overwrite, rebuild_base=args.rebuild_base)
    except TrainingStopped as stopped:
        again = f" --stage {args.stage}" if args.stage != "sft" else ""
        print(f"{stopped}; run loraft demo{again} --overwrite to start it again", file=sys.stderr)
        return STOPPED_EXIT_CODE
    return 0
