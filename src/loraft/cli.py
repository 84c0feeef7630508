"""Command line: one table of commands mapped to the entry functions of each stage; nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from typing import Optional

from loraft.errors import LoraftError, require

# A run stopped on SIGTERM/SIGINT exits 75 (EX_TEMPFAIL in sysexits.h: "try again later"): it saved a checkpoint and
# is resumable. Unlike 0 a `&&` chain or a job scheduler does not take it for finished; unlike 2 (an error),
# 1 (a bug) or death by a signal (128+N in a shell) it says that nothing was lost since the checkpoint.
STOPPED_EXIT_CODE = 75


def _data_config(args):
    return _data_settings(args).data


def _preference_limits(args):
    return _data_settings(args).preference


def _data_settings(args):
    """The data flags as a validated config: a bad value is one sentence naming its key."""
    from loraft.config import config_from_sections

    fields = {"path": args.path, "template": args.template, "max_length": args.max_length, "format": args.format,
              "allow_empty_responses": getattr(args, "allow_empty_responses", False)}
    if getattr(args, "limit", None):
        fields["limit"] = args.limit
    limits = {"max_prompt_length": args.max_prompt_length, "max_completion_length": args.max_completion_length}
    return config_from_sections("command line", data=fields, preference=limits)


def _is_preference_data(args) -> bool:
    from loraft.records import PREFERENCE_FORMATS, source_format

    return source_format(args.path, _data_config(args)) in PREFERENCE_FORMATS


def cmd_train(args) -> int:
    from loraft.config import load_config
    from loraft.presets import resolve_config_source
    from loraft.train import train

    from loraft.train import TrainingStopped

    config = load_config(resolve_config_source(args.config), args.overrides)
    try:
        run_dir = train(config, resume=args.resume)
    except TrainingStopped as stopped:
        if _rank() == 0:
            command = shlex.join(["loraft", "train", args.config, *args.overrides])
            print(f"stopped at step {stopped.step}; resume with: {command} --resume" if stopped.checkpoint
                  else f"stopped before the first checkpoint; start again with: {command}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    if _rank() == 0:
        print(f"run directory: {run_dir}")
    return 0


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


def cmd_data_check(args) -> int:
    from loraft.data import check_data, format_report
    from loraft.preference import check_preferences, format_preference_report

    tokenizer = _tokenizer(args.model) if args.model else None
    if _is_preference_data(args):
        report = check_preferences(args.path, _data_config(args), tokenizer, _preference_limits(args))
        print(json.dumps(report, ensure_ascii=False) if args.json else format_preference_report(report))
        return 0
    report = check_data(args.path, _data_config(args), tokenizer)
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return 0


def cmd_data_preview(args) -> int:
    from loraft.data import preview_samples
    from loraft.preference import format_preview, preview_preferences

    if _is_preference_data(args):
        for sample in preview_preferences(args.path, _data_config(args), _tokenizer(args.model), args.limit,
                                          _preference_limits(args)):
            print(json.dumps(sample, ensure_ascii=False) if args.json else format_preview(sample))
        return 0
    samples = preview_samples(args.path, _data_config(args), _tokenizer(args.model), args.limit)
    for sample in samples:
        if args.json:
            print(json.dumps(sample, ensure_ascii=False))
        else:
            print(f"--- {sample['source']} ({len(sample['input_ids'])} tokens, "
                  f"{sum(1 for label in sample['labels'] if label != -100)} supervised)")
            print(sample["text"])
    return 0


def _tokenizer(name: str):
    from loraft.model import load_tokenizer

    return load_tokenizer(name)


def cmd_inspect(args) -> int:
    from loraft.errors import ModelError
    from loraft.model import format_inspection, inspect_model

    adapter = None
    model = args.model
    if args.preset:
        from loraft.config import load_config
        from loraft.presets import preset_path, shipped_shape

        preset = load_config(preset_path(args.preset))
        adapter = preset.adapter
        model = model or preset.model.name_or_path
    if model is None:
        raise ModelError("inspect: give a model (name or directory) or --preset NAME")
    try:
        report = inspect_model(model, args.target, args.modules_to_save, adapter=adapter)
    except ModelError:
        shape = shipped_shape(model) if args.preset and not args.model else None
        if shape is None:
            raise
        # offline: the preset's model is not reachable, but its architecture ships with loraft
        report = inspect_model(str(shape), args.target, args.modules_to_save, adapter=adapter)
        report["model"] = f"{model} (shape shipped with loraft; no weights read)"
    if args.preset:
        report["model"] += f" — preset {args.preset}"
    if args.json:
        print(json.dumps({"matched": report["matched"], "trainable_params": report["trainable_params"],
                          "total_params": report["total_params"]}))
    else:
        print(format_inspection(report))
    return 0


def _generation_settings(args) -> dict:
    """The sampling flags given on the command line (None = not given: the run's saved value stays)."""
    return {k: getattr(args, k, None) for k in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                "repetition_penalty")}


def cmd_chat(args) -> int:
    from loraft.generate import chat

    chat(args.run_dir, _generation_settings(args), system=args.system, access=_access(args), base_only=args.base)
    return 0


def cmd_generate(args) -> int:
    from loraft.generate import generate_one, generate_to_file

    settings = _generation_settings(args)
    if args.prompt is not None:
        for piece in generate_one(args.run_dir, args.prompt, settings, access=_access(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    if not (args.input and args.output):
        raise LoraftError("generate needs --prompt TEXT, or --input FILE with --output FILE")
    count = generate_to_file(args.run_dir, args.input, args.output, settings, args.batch_size, access=_access(args))
    print(f"wrote {count} answers to {args.output}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from loraft.evaluate import evaluate, format_table

    metrics = evaluate(args.run_dir, args.data, limit=args.limit, base=args.base, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, access=_access(args))
    print(format_table(metrics))
    print(f"wrote {args.run_dir}/eval/metrics.json and predictions.jsonl", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from loraft.export import merge_run

    out_dir = merge_run(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, access=_access(args))
    print(f"merged model: {out_dir}")
    return 0


def cmd_export(args) -> int:
    from loraft.export.gguf import export_gguf

    export_gguf(args.run_dir, args.out, outtype=args.outtype, adapter_only=args.adapter_only,
                llama_cpp=args.llama_cpp, verify=not args.no_verify, overwrite=args.overwrite, access=_access(args),
                log=lambda line: print(line, file=sys.stderr))
    return 0


def cmd_serve(args) -> int:
    require("serve", "serve", "fastapi", "uvicorn")
    from loraft.serve import serve

    serve(args.run_dir, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LORAFT_API_KEY"),
          max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
          allowed_hosts=args.allowed_hosts, shutdown_timeout=args.shutdown_timeout,
          context_length=args.context_length, dtype=args.dtype, access=_access(args), base_only=args.base)
    return 0


def cmd_demo(args) -> int:
    from loraft.demo import run_demo, run_preference_demo
    from loraft.train import TrainingStopped

    stage = run_preference_demo if args.stage == "preference" else run_demo
    try:
        stage(workdir=args.workdir, overwrite=args.overwrite, rebuild_base=args.rebuild_base)
    except TrainingStopped as stopped:
        again = " --stage preference" if args.stage == "preference" else ""
        print(f"{stopped}; run loraft demo{again} --overwrite to start it again", file=sys.stderr)
        return STOPPED_EXIT_CODE
    return 0


def cmd_runs(args) -> int:
    from pathlib import Path

    from loraft.rundir import find_runs, run_state

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


def cmd_stop(args) -> int:
    from pathlib import Path

    from loraft.rundir import stop_run

    state = stop_run(args.run_dir, timeout=args.timeout)
    run_dir, status = Path(args.run_dir), state["status"]
    if status == "stopped":
        print(f"{run_dir}: stopped at step {state['step']}; resume with: loraft train {run_dir / 'config.yaml'} "
              "--resume")
    elif status == "finished":
        print(f"{run_dir}: finished (the stop came during its final save)")
    else:
        checkpoint = f"; its newest checkpoint is {state['checkpoint']}" if state["checkpoint"] else ""
        print(f"{run_dir}: ended {status} at step {state['step']}{checkpoint}")
    return 0 if status in ("stopped", "finished") else 1


def cmd_ui(args) -> int:
    require("ui", "serve", "fastapi", "uvicorn")
    from loraft.ui.start import serve_ui

    serve_ui(args.workspace, host=args.host, port=args.port, token=args.token or os.environ.get("LORAFT_UI_TOKEN"),
             allowed_hosts=args.allowed_hosts, kernel_confinement=not args.no_kernel_confinement,
             allow_hub=args.allow_hub, time_limit=args.time_limit, max_runs=args.max_runs, max_jobs=args.max_jobs,
             max_streams=args.max_streams, max_chat_loads=args.max_chat_loads)
    return 0


def cmd_config(args) -> int:
    from loraft.config import describe_fields
    from loraft.presets import preset_names, preset_path

    if args.presets:
        for name in preset_names():
            print(f"{name:24} {preset_path(name)}")
        return 0
    if args.preset:
        # the file as shipped, header comments included, to redirect into a config of one's own
        sys.stdout.write(preset_path(args.preset).read_text(encoding="utf-8"))
        return 0
    if args.markdown:
        print("| key | type | default | description |\n|---|---|---|---|")
    for key, type_name, default, description in describe_fields():
        default_text = json.dumps(default, ensure_ascii=False)
        if args.markdown:
            cell = default_text.replace("|", "\\|")
            print(f"| `{key}` | {type_name.replace('|', ' or ')} | `{cell}` | {description} |")
        else:
            print(f"{key:38} {type_name:24} {default_text:28} {description}")
    return 0


def cmd_templates(args) -> int:
    from loraft.templates import TEMPLATES

    for template in TEMPLATES.values():
        print(f"{template.name:18} {template.description}")
    print(f"{'model':18} The model's own chat_template (from its tokenizer): loss on assistant turns and their "
          "end-of-turn token.")
    print(f"{'auto':18} The default: model when the tokenizer has a chat_template, else human_assistant.")
    return 0


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="data: save_to_disk dir, .json, .jsonl, .csv, .parquet, or hub dataset id")
    parser.add_argument("--template", default="auto",
                        help="prompt template: a name from `loraft templates`, model (the tokenizer's own "
                        "chat_template) or auto (the tokenizer's own when it has one, else human_assistant; default)")
    parser.add_argument("--max-length", type=int, default=256,
                        help="truncation length, data.max_length (default: 256); preference data: prompt + completion")
    parser.add_argument("--format", default="auto", choices=[
        "auto", "alpaca", "messages", "sharegpt", "preference_alpaca", "preference_messages", "preference_sharegpt",
        "unpaired_alpaca", "unpaired_messages", "unpaired_sharegpt"], help="record format (data.format; default: auto)")
    parser.add_argument("--max-prompt-length", type=int,
                        help="preference data: keep a longer prompt's last N tokens (preference.max_prompt_length)")
    parser.add_argument("--max-completion-length", type=int,
                        help="preference data: cut each completion to N tokens (preference.max_completion_length)")
    parser.add_argument("--allow-empty-responses", action="store_true",
                        help="accept data in which every response is empty (data.allow_empty_responses)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _access(args):
    from loraft.rundir import RunAccess

    return RunAccess(allow_unfinished=args.allow_unfinished, trust_remote_code=args.trust_remote_code,
                     checkpoint=args.checkpoint)


def _add_run_access_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="use an unfinished or failed run's newest complete checkpoint")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow modelling code from the run's base model folder (never taken from the run)")
    parser.add_argument("--checkpoint", metavar="NAME",
                        help="use the run's checkpoint NAME (checkpoint-N under checkpoints/) instead of its adapter")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    # unset flags keep the run's saved generation.* (config.yaml); given ones apply on top
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's generation.max_new_tokens")
    parser.add_argument("--temperature", type=float, help="0 = greedy; default: the run's generation.temperature")
    parser.add_argument("--top-p", type=float, help="default: the run's generation.top_p")
    parser.add_argument("--top-k", type=int, help="default: the run's generation.top_k")
    parser.add_argument("--repetition-penalty", type=float, help="default: the run's generation.repetition_penalty")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraft", description="LoRA fine-tuning: data -> adapter -> eval -> chat/serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune a model from a YAML config")
    train.add_argument("config", help="YAML config file, or a shipped preset's name (see `loraft config --presets`)")
    train.add_argument("overrides", nargs="*", help="dot-overrides, e.g. train.max_steps=3 output_dir=out")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    train.set_defaults(handler=cmd_train)

    plan = sub.add_parser("plan", help="show what a training run would do on this machine, without training")
    plan.add_argument("config", help="YAML config file, or a shipped preset's name")
    plan.add_argument("overrides", nargs="*", help="dot-overrides, e.g. train.precision=fp32")
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")
    plan.add_argument("--measure", action="store_true",
                      help="measure the speed choices now (else: the cached measurement, or the static defaults)")
    plan.set_defaults(handler=cmd_plan)

    data = sub.add_parser("data", help="check or preview training data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser("check", help="validate data and print a report")
    _add_data_options(check)
    check.add_argument("--model", help="tokenizer to measure token lengths with")
    check.set_defaults(handler=cmd_data_check)
    preview = data_sub.add_parser("preview", help="show samples as training sees them, prompt part marked")
    _add_data_options(preview)
    preview.add_argument("--model", required=True, help="model/tokenizer name or directory")
    preview.add_argument("--limit", type=int, default=5, help="samples to show (default: 5)")
    preview.set_defaults(handler=cmd_data_preview)

    inspect = sub.add_parser("inspect", help="show which modules an adapter pattern matches (no weights read)")
    inspect.add_argument("model", nargs="?", default=None,
                         help="model name or directory (only its config is read); default: the preset's model")
    inspect.add_argument("--preset", default=None,
                         help="show what a shipped preset trains (its target_modules and modules_to_save)")
    inspect.add_argument("--target", default=None,
                         help=r"target_modules regex or name (default: the preset's, else .*\.1.*query_key_value)")
    inspect.add_argument("--modules-to-save", nargs="*", default=None, help="modules trained in full")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=cmd_inspect)

    chat = sub.add_parser("chat", help="chat with a trained run in the terminal")
    chat.add_argument("run_dir")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--base", action="store_true", help="chat with the run's base model, without the adapter")
    _add_sampling_options(chat)
    _add_run_access_options(chat)
    chat.set_defaults(handler=cmd_chat)

    generate = sub.add_parser("generate", help="answer a prompt, or a file of prompts in batches")
    generate.add_argument("run_dir")
    generate.add_argument("--prompt")
    generate.add_argument("--input", help=".jsonl/.json with messages, instruction(+input) or prompt per record")
    generate.add_argument("--output", help="JSONL file to write (must not exist)")
    generate.add_argument("--batch-size", type=int, default=8)
    _add_sampling_options(generate)
    _add_run_access_options(generate)
    generate.set_defaults(handler=cmd_generate)

    evaluate = sub.add_parser("eval", help="score a run on held-out data: loss, perplexity, exact match, ROUGE, BLEU; "
                              "preference accuracy on preference records")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", required=True,
                          help="held-out records (any format `loraft data check` reads); preference records "
                          "(chosen/rejected, or completion/label) are scored by preference accuracy")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N records")
    evaluate.add_argument("--base", action="store_true",
                          help="also score the base model with the same template (preference records: the run's "
                          "starting point, its model.adapter_from run if it has one)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-new-tokens", type=int, help="most tokens per answer (default: the run's setting)")
    _add_run_access_options(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    merge = sub.add_parser("merge", help="merge the adapter into the base and write a standalone model")
    merge.add_argument("run_dir")
    merge.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    merge.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"], help="weights dtype (default: fp32)")
    merge.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default: 2GB)")
    merge.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_run_access_options(merge)
    merge.set_defaults(handler=cmd_merge)

    export = sub.add_parser("export", help="GGUF for llama.cpp / Ollama with a Modelfile, verified by llama.cpp")
    export.add_argument("run_dir")
    export.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    export.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_k_m"],
                        help="weight type (default: f16; q4_k_m needs llama.cpp's llama-quantize)")
    export.add_argument("--adapter-only", action="store_true",
                        help="write the base GGUF and a LoRA adapter GGUF (llama-cli --lora, Ollama ADAPTER)")
    export.add_argument("--out", help="directory to write (default: RUN-gguf beside the run; empty or absent)")
    export.add_argument("--llama-cpp", metavar="DIR",
                        help="a llama.cpp checkout to convert with (default: $LLAMA_CPP_DIR, else a pinned copy)")
    export.add_argument("--no-verify", action="store_true", help="skip the comparison with llama.cpp")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_run_access_options(export)
    export.set_defaults(handler=cmd_export)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server and chat page for a run")
    serve.add_argument("run_dir")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LORAFT_API_KEY, else none)")
    serve.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    serve.add_argument("--max-queue", type=int, default=16,
                       help="requests that may wait for the model; more get 429 with Retry-After (default: 16)")
    serve.add_argument("--allowed-hosts", nargs="*", default=(), metavar="NAME",
                       help="Host names answered besides the bound address ('*': any)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight and queued requests get after SIGTERM (default: 30)")
    serve.add_argument("--context-length", type=int, help="most prompt + answer tokens (default: the model's)")
    serve.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                       help="weights dtype (default: the run's generation.dtype)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    serve.add_argument("--base", action="store_true", help="serve the run's base model, without the adapter")
    _add_run_access_options(serve)
    serve.set_defaults(handler=cmd_serve)

    demo = sub.add_parser("demo", help="offline demo: build a tiny Chinese base, fine-tune it, show before/after")
    demo.add_argument("--workdir", default="loraft-demo", help="where the demo writes data and its run")
    demo.add_argument("--stage", choices=("sft", "preference"), default="sft",
                      help="sft: the LoRA fine-tune (run/); preference: DPO on generated pairs from the sft stage's "
                      "run (preference-run/), running the sft stage first where workdir has no finished one")
    demo.add_argument("--overwrite", action="store_true", help="replace a previous demo run of this stage in workdir")
    demo.add_argument("--rebuild-base", action="store_true",
                      help="pretrain the demo's base model anew (cached) instead of using the one shipped with loraft")
    demo.set_defaults(handler=cmd_demo)

    runs = sub.add_parser("runs", help="list the runs in a directory: status (live or not), step, loss, start time")
    runs.add_argument("dir", nargs="?", default=".", help="where to look: a run, or runs one or two levels below "
                      "(default: .)")
    runs.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    runs.set_defaults(handler=cmd_runs)

    stop = sub.add_parser("stop", help="stop a running training gracefully: finish the step, checkpoint, exit")
    stop.add_argument("run_dir")
    stop.add_argument("--timeout", type=float, default=120.0,
                      help="seconds to wait for the run to end (default: 120)")
    stop.set_defaults(handler=cmd_stop)

    ui = sub.add_parser("ui", help="the workflow in a browser: runs, live curves, data, eval, merge, export, chat")
    ui.add_argument("--workspace", default=".", help="the folder whose runs the UI shows and starts (default: .)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: 127.0.0.1; any other needs --token)")
    ui.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    ui.add_argument("--token", help="require the header 'X-Loraft-Token: T' (default: $LORAFT_UI_TOKEN, else none)")
    ui.add_argument("--allowed-hosts", nargs="*", default=(), metavar="NAME",
                    help="Host names answered besides the bound address ('*': any)")
    ui.add_argument("--allow-hub", action="store_true",
                    help="let a model or data name that is no file in the workspace be a hub id (downloads)")
    ui.add_argument("--time-limit", type=float, default=120.0, metavar="S",
                    help="seconds one plan, data check, preview or config check may take (default: 120)")
    ui.add_argument("--max-runs", type=int, default=4, metavar="N",
                    help="runs starting or running at once (default: 4; 0: the UI starts none)")
    ui.add_argument("--max-jobs", type=int, default=4, metavar="N",
                    help="eval, merge and export jobs running at once (default: 4)")
    ui.add_argument("--max-streams", type=int, default=64, metavar="N",
                    help="live-curve event streams open at once (default: 64)")
    ui.add_argument("--max-chat-loads", type=int, default=2, metavar="N",
                    help="chat models loading at once (default: 2)")
    ui.add_argument("--no-kernel-confinement", action="store_true",
                    help="do not ask the kernel (Landlock) to confine the UI and its runs to the workspace and "
                         "caches; paths are still checked before use")
    ui.set_defaults(handler=cmd_ui)

    config = sub.add_parser("config", help="print every config key with its type, default and description")
    config_view = config.add_mutually_exclusive_group()
    config_view.add_argument("--markdown", action="store_true", help="print the table as Markdown (README reference)")
    config_view.add_argument("--preset", metavar="NAME", help="print a shipped preset's YAML, to save and edit")
    config_view.add_argument("--presets", action="store_true", help="list the shipped presets and where they are")
    config.set_defaults(handler=cmd_config)
    templates = sub.add_parser("templates", help="list prompt templates")
    templates.set_defaults(handler=cmd_templates)

    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # transformers 5 warns from its own Trainer/peft path about a rename it has not finished; not the user's to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes (the qlora extra) warns at import about an optional CPU kernel package loraft does not use
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Under torchrun / accelerate launch only rank 0 speaks.
    logging.getLogger("loraft").setLevel(logging.INFO if _rank() == 0 else logging.WARNING)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except LoraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
