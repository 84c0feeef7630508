"""Command line: one table of commands mapped to the entry functions of each stage; nothing else.

Each command's options and handler stand together in the module of its group: `train.py` (train, plan), `data.py`
(data check / preview, inspect, config, templates), `use.py` (what uses a trained run: chat, generate, eval, merge,
export, serve) and `runs.py` (runs, stop, ui, demo). A handler imports its stage when it runs, so `loraft --help`
imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional

from loraft.cli import data, runs, train, use
from loraft.cli.train import STOPPED_EXIT_CODE, rank
from loraft.errors import LoraftError

__all__ = ["COMMANDS", "STOPPED_EXIT_CODE", "build_parser", "main"]

# (name, help, what adds its options, its handler), in the order `loraft --help` lists them; a command made of
# actions (`loraft data check`) has their own table in place of its options, and no handler
DATA_ACTIONS = (
    ("check", "validate data and print a report", data.check_arguments, data.cmd_data_check),
    ("preview", "show samples as training sees them, prompt part marked", data.preview_arguments,
     data.cmd_data_preview),
)
COMMANDS = (
    ("train", "fine-tune a model from a YAML config", train.train_arguments, train.cmd_train),
    ("plan", "show what a training run would do on this machine, without training", train.plan_arguments,
     train.cmd_plan),
    ("data", "check or preview training data", DATA_ACTIONS, None),
    ("inspect", "show which modules an adapter pattern matches (no weights read)", data.inspect_arguments,
     data.cmd_inspect),
    ("chat", "chat with a trained run in the terminal", use.chat_arguments, use.cmd_chat),
    ("generate", "answer a prompt, or a file of prompts in batches", use.generate_arguments, use.cmd_generate),
    ("eval", "score a run on held-out data: loss, perplexity, exact match, ROUGE, BLEU; preference accuracy on "
     "preference records", use.eval_arguments, use.cmd_eval),
    ("merge", "merge the adapter into the base and write a standalone model", use.merge_arguments, use.cmd_merge),
    ("export", "GGUF for llama.cpp / Ollama with a Modelfile, verified by llama.cpp", use.export_arguments,
     use.cmd_export),
    ("serve", "OpenAI-compatible HTTP server and chat page for a run", use.serve_arguments, use.cmd_serve),
    ("demo", "offline demo: build a tiny Chinese base, fine-tune it, show before/after", runs.demo_arguments,
     runs.cmd_demo),
    ("runs", "list the runs in a directory: status (live or not), step, loss, start time", runs.runs_arguments,
     runs.cmd_runs),
    ("stop", "stop a running training gracefully: finish the step, checkpoint, exit", runs.stop_arguments,
     runs.cmd_stop),
    ("ui", "the workflow in a browser: runs, live curves, data, eval, merge, export, chat", runs.ui_arguments,
     runs.cmd_ui),
    ("config", "print every config key with its type, default and description", data.config_arguments,
     data.cmd_config),
    ("templates", "list prompt templates", None, data.cmd_templates),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraft",
                                     description="LoRA fine-tuning: data -> adapter -> eval -> chat/serve.")
    _add_commands(parser, COMMANDS, dest="command", metavar="COMMAND")
    return parser


def _add_commands(parser: argparse.ArgumentParser, table: tuple, dest: str, metavar: str) -> None:
    commands = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    for name, help_text, options, handler in table:
        command = commands.add_parser(name, help=help_text)
        if handler is None:  # a command made of actions
            _add_commands(command, options, dest=f"{name}_command", metavar="ACTION")
            continue
        if options is not None:
            options(command)
        command.set_defaults(handler=handler)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # transformers 5 warns from its own Trainer/peft path about a rename it has not finished; not the user's to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes (the qlora extra) warns at import about an optional CPU kernel package loraft does not use
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Under torchrun / accelerate launch only rank 0 speaks.
    logging.getLogger("loraft").setLevel(logging.INFO if rank() == 0 else logging.WARNING)


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
