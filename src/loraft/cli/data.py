"""The commands that look at a run's inputs before training: `loraft data check` / `data preview` (SFT or
preference records), `inspect` (the modules an adapter pattern matches), `config` (every key, the shipped presets)
and `templates`."""

from __future__ import annotations

import argparse
import json
import sys


DATA_FLAG_DEFAULTS = {"template": "auto", "max_length": 256, "format": "auto"}


def _data_settings(args):
    """The data flags as a validated config: a bad value is one sentence naming its key. With --config, that run
    config (its objective and rewards decide how the records are read: a GRPO config's prompts are checked against
    its rewards) with data.path and the flags given on the command line in place of its own."""
    from loraft.config import config_from_sections, load_config

    given = {name: getattr(args, name) for name in DATA_FLAG_DEFAULTS if getattr(args, name) is not None}
    if getattr(args, "allow_empty_responses", False):
        given["allow_empty_responses"] = True
    if getattr(args, "limit", None):
        given["limit"] = args.limit
    limits = {name: getattr(args, name) for name in ("max_prompt_length", "max_completion_length")
              if getattr(args, name) is not None}
    if getattr(args, "config", None):
        overrides = [f"data.path={args.path}", *(f"data.{k}={v}" for k, v in given.items()),
                     *(f"preference.{k}={v}" for k, v in limits.items())]
        return load_config(args.config, overrides)
    fields = {**DATA_FLAG_DEFAULTS, "path": args.path, "allow_empty_responses": False, **given}
    return config_from_sections("command line", data=fields, preference=limits)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="data: save_to_disk dir, .json, .jsonl, .csv, .parquet, or hub dataset id")
    parser.add_argument("--template",
                        help="prompt template: a name from `loraft templates`, model (the tokenizer's own "
                        "chat_template) or auto (the tokenizer's own when it has one, else human_assistant; default)")
    parser.add_argument("--max-length", type=int,
                        help="truncation length, data.max_length (default: 256); preference data: prompt + completion")
    parser.add_argument("--format", choices=[
        "auto", "alpaca", "messages", "sharegpt", "preference_alpaca", "preference_messages", "preference_sharegpt",
        "unpaired_alpaca", "unpaired_messages", "unpaired_sharegpt"], help="record format (data.format; default: auto)")
    parser.add_argument("--max-prompt-length", type=int,
                        help="preference data: keep a longer prompt's last N tokens (preference.max_prompt_length)")
    parser.add_argument("--max-completion-length", type=int,
                        help="preference data: cut each completion to N tokens (preference.max_completion_length)")
    parser.add_argument("--allow-empty-responses", action="store_true",
                        help="accept data in which every response is empty (data.allow_empty_responses)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--config", help="a run config (YAML or preset) to read the records as its run would: its "
                        "data settings, and for train.objective=grpo its prompts checked against its rewards")


def check_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_options(parser)
    parser.add_argument("--model", help="tokenizer to measure token lengths with")


def cmd_data_check(args) -> int:
    from loraft.objectives.kinds import record_kind

    settings = _data_settings(args)
    kind = record_kind(settings)  # conversations (loraft.data), preferences (loraft.preference), prompts (GRPO)
    report = kind.check(args.path, settings, _tokenizer(args.model) if args.model else None)
    print(json.dumps(report, ensure_ascii=False) if args.json else kind.format_report(report))
    return 0


def preview_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_options(parser)
    parser.add_argument("--model", required=True, help="model/tokenizer name or directory")
    parser.add_argument("--limit", type=int, default=5, help="samples to show (default: 5)")


def cmd_data_preview(args) -> int:
    from loraft.objectives.kinds import record_kind

    settings = _data_settings(args)
    kind = record_kind(settings)
    for sample in kind.preview(args.path, settings, _tokenizer(args.model), args.limit):
        print(json.dumps(sample, ensure_ascii=False) if args.json else kind.format_sample(sample))
    return 0


def _tokenizer(name: str):
    from loraft.model import load_tokenizer

    return load_tokenizer(name)


def inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model name or directory (only its config is read); default: the preset's model")
    parser.add_argument("--preset", default=None,
                        help="show what a shipped preset trains (its target_modules and modules_to_save)")
    parser.add_argument("--target", default=None,
                        help=r"target_modules regex or name (default: the preset's, else .*\.1.*query_key_value)")
    parser.add_argument("--modules-to-save", nargs="*", default=None, help="modules trained in full")
    parser.add_argument("--json", action="store_true")


def cmd_inspect(args) -> int:
    from loraft.errors import ModelError
    from loraft.inspection import format_inspection, inspect_model

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


def config_arguments(parser: argparse.ArgumentParser) -> None:
    config_view = parser.add_mutually_exclusive_group()
    config_view.add_argument("--markdown", action="store_true", help="print the table as Markdown (README reference)")
    config_view.add_argument("--preset", metavar="NAME", help="print a shipped preset's YAML, to save and edit")
    config_view.add_argument("--presets", action="store_true", help="list the shipped presets and where they are")


def cmd_config(args) -> int:
    from loraft.config import REQUIRED, describe_fields
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
        default_text = "required" if default is REQUIRED else json.dumps(default, ensure_ascii=False)
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
