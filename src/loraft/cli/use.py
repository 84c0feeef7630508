"""The commands that use a trained run directory, which is all they need: `loraft chat`, `generate`, `eval`,
`merge`, `export` and `serve`, with the options they share (which checkpoint, remote code, sampling)."""

from __future__ import annotations

import argparse
import os
import sys

from loraft.errors import LoraftError, require


def _access(args):
    from loraft.run_access import RunAccess

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


def _generation_settings(args) -> dict:
    """The sampling flags given on the command line (None = not given: the run's saved value stays)."""
    return {k: getattr(args, k, None) for k in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                "repetition_penalty")}


def chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--base", action="store_true", help="chat with the run's base model, without the adapter")
    _add_sampling_options(parser)
    _add_run_access_options(parser)


def cmd_chat(args) -> int:
    from loraft.generate import chat

    chat(args.run_dir, _generation_settings(args), system=args.system, access=_access(args), base_only=args.base)
    return 0


def generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--prompt")
    parser.add_argument("--input", help=".jsonl/.json with messages, instruction(+input) or prompt per record")
    parser.add_argument("--output", help="JSONL file to write (must not exist)")
    parser.add_argument("--batch-size", type=int, default=8)
    _add_sampling_options(parser)
    _add_run_access_options(parser)


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


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--data",
                        help="held-out records (any format `loraft data check` reads); preference records "
                        "(chosen/rejected, or completion/label) are scored by preference accuracy; a GRPO run's "
                        "prompt records by its rewards (mean and pass@1); without it, retention alone")
    parser.add_argument("--no-retention", dest="retention", action="store_false",
                        help="skip retention: general accuracy of base and run on loraft's general prompts, and the "
                        "KL per token from the base (the base's answers are cached)")
    parser.add_argument("--retention-limit", type=int, help="retention on the first N general prompts only")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--base", action="store_true",
                        help="also score the base model with the same template (preference records: the run's "
                        "starting point, its model.adapter_from run if it has one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="most tokens per answer (default: the run's setting)")
    _add_run_access_options(parser)


def cmd_eval(args) -> int:
    from loraft.evaluate import evaluate, format_table
    from loraft.rundir import EVAL_METRICS, EVAL_PREDICTIONS, RunDir

    metrics = evaluate(args.run_dir, args.data, limit=args.limit, base=args.base, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, access=_access(args), retention=args.retention,
                       retention_limit=args.retention_limit)
    print(format_table(metrics))
    written = f" and {EVAL_PREDICTIONS}" if args.data else ""
    print(f"wrote {RunDir(args.run_dir).eval_dir / EVAL_METRICS}{written}", file=sys.stderr)
    return 0


def merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="weights dtype (default: fp32)")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default: 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_run_access_options(parser)


def cmd_merge(args) -> int:
    from loraft.export import merge_run

    out_dir = merge_run(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, access=_access(args))
    print(f"merged model: {out_dir}")
    return 0


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_k_m"],
                        help="weight type (default: f16; q4_k_m needs llama.cpp's llama-quantize)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the base GGUF and a LoRA adapter GGUF (llama-cli --lora, Ollama ADAPTER)")
    parser.add_argument("--out", help="directory to write (default: RUN-gguf beside the run; empty or absent)")
    parser.add_argument("--llama-cpp", metavar="DIR",
                        help="a llama.cpp checkout to convert with (default: $LLAMA_CPP_DIR, else a pinned copy)")
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with llama.cpp")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_run_access_options(parser)


def cmd_export(args) -> int:
    from loraft.export.gguf import export_gguf

    export_gguf(args.run_dir, args.out, outtype=args.outtype, adapter_only=args.adapter_only,
                llama_cpp=args.llama_cpp, verify=not args.no_verify, overwrite=args.overwrite, access=_access(args),
                log=lambda line: print(line, file=sys.stderr))
    return 0


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="+", metavar="RUN_DIR",
                        help="one run directory, or several on one base (served on one copy of it, each under its "
                             "directory's name; the base under its own)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LORAFT_API_KEY, else none)")
    parser.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for the model; more get 429 with Retry-After (default: 16)")
    parser.add_argument("--allowed-hosts", nargs="*", default=(), metavar="NAME",
                        help="Host names answered besides the bound address ('*': any)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight and queued requests get after SIGTERM (default: 30)")
    parser.add_argument("--context-length", type=int, help="most prompt + answer tokens (default: the model's)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights dtype (default: the run's generation.dtype)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    parser.add_argument("--base", action="store_true", help="serve the run's base model, without the adapter")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="most requests decoded together, of any of the runs (default: 8; 1: one at a time)")
    parser.add_argument("--one-adapter-per-batch", action="store_true",
                        help="batch only requests for one adapter at a time (default: batches mix adapters)")
    parser.add_argument("--adapters-dir", metavar="DIR",
                        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter for runs inside DIR "
                             "(off loopback this needs --api-key)")
    parser.add_argument("--max-adapters", type=int, default=64,
                        help="most adapters loaded at once through /v1/load_lora_adapter (default: 64)")
    _add_run_access_options(parser)


def cmd_serve(args) -> int:
    require("serve", "serve", "fastapi", "uvicorn")
    from loraft.serve import serve

    serve(args.run_dir, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LORAFT_API_KEY"),
          max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
          allowed_hosts=args.allowed_hosts, shutdown_timeout=args.shutdown_timeout,
          context_length=args.context_length, dtype=args.dtype, access=_access(args), base_only=args.base,
          max_batch=args.max_batch, mix_adapters=not args.one_adapter_per_batch, adapters_dir=args.adapters_dir,
          max_adapters=args.max_adapters)
    return 0
