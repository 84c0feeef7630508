"""Prompt-only records (train.objective grpo): read, checked against the rewards, rendered and tokenized.

A record is a prompt and the fields its rewards read. The prompt is, by the first field found:
- alpaca: `instruction` (+ `input`, `system`, `history`; data.*_field names them), as SFT renders it;
- `prompt`: a string (the user turn) or messages ending with a user turn (TRL's prompt-only formats);
- `messages` (data.messages_field): messages ending with a user turn;
- `conversations`: ShareGPT turns ending with the human.
Every other top-level field holding a string, number, boolean or null is passed to the rewards by its name
(`answer=[...]`, as TRL passes dataset columns); a field whose values mix types across records is passed as text.

The prompt is rendered by the run's template with the generation prompt (data.template: loraft's, or the model's
own) and encoded exactly as `loraft chat` encodes a prompt (loraft.generate.encode_prompt), so generation during
training and after it see the same ids. data.max_length limits the prompt: a longer one is dropped, counted in the
report, as SFT drops a sample left with no response token; the completion's budget is grpo.max_completion_length.
"""

from __future__ import annotations

from typing import Sequence

from loraft.config import DataConfig, RunConfig
from loraft.data import PROMPT_CLOSE, PROMPT_OPEN, PreparedData, check_tokenizer, split_eval, token_pieces
from loraft.encode import BatchEncoder, encode_rendered
from loraft.errors import DataError, TemplateError
from loraft.records import PROMPT_FIELD, SHAREGPT_FIELD, prompt_messages
from loraft.rewards import RECORD_COLUMN, TRL_KEYWORDS, check_fields
from loraft.sources import describe_value, field_names, read_records
from loraft.templates import Template, get_template

KIND = "prompts"
DROPPED_LONG_PROMPT = "prompt_longer_than_max_length"
ENCODE_BATCH = 1000
# names TRL gives its own arguments of a reward function: a record field of that name is not passed along
RESERVED = ("prompt", "prompts", "completion", "completions", "completion_ids", "prompt_ids", RECORD_COLUMN,
            *TRL_KEYWORDS)

PromptRecord = dict  # {"prompt": [messages], "fields": {name: scalar}, "source": "<file>, line 3", "style": ...}


def _style(path: str, where: str, record: dict, data: DataConfig) -> tuple[str, str]:
    """(prompt style, its field) of a prompt-only record."""
    for style, field in (("alpaca", data.instruction_field), ("messages", PROMPT_FIELD),
                         ("messages", data.messages_field), ("sharegpt", SHAREGPT_FIELD)):
        if field in record:
            return style, field
    raise DataError(path, f"no prompt among its fields ({field_names(record)}): a GRPO record gives "
                    f"{data.instruction_field} (alpaca), {PROMPT_FIELD}, {data.messages_field} or {SHAREGPT_FIELD}",
                    where=where)


def _fields(record: dict, prompt_field: str) -> dict:
    return {name: value for name, value in record.items()
            if name != prompt_field and name not in RESERVED
            and (value is None or isinstance(value, (str, int, float, bool)))}


def read_prompts(path: str, data: DataConfig) -> tuple[list[PromptRecord], str]:
    """Prompt-only records in source order (the first data.limit), and the source kind.

    Raises:
        DataError: naming the file, the record and the field (no prompt, a prompt not ending with a user turn).
    """
    kind, _, records = read_records(path, data)
    if not records:
        raise DataError(path, "holds no records")
    prompts = []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(path, f"expected an object with fields, got {describe_value(record)}", where=where)
        style, field = _style(path, where, record, data)
        messages = prompt_messages(path, where, record, style, data, field)
        prompts.append({"prompt": messages, "fields": _fields(record, field), "source": f"{path}, {where}",
                        "style": style if field != PROMPT_FIELD else "prompt"})
    return prompts, kind


def read_with_report(path: str, data: DataConfig) -> tuple[list[PromptRecord], dict]:
    """Prompt records and the record-level report (what `loraft data check` shows without a tokenizer)."""
    prompts, kind = read_prompts(str(path), data)
    styles = sorted({prompt["style"] for prompt in prompts})
    fields = sorted({name for prompt in prompts for name in prompt["fields"]})
    return prompts, {
        "path": str(path), "source_kind": kind, "format": "prompts (" + ", ".join(styles) + ")",
        "records_read": len(prompts), "fields": fields,
        "multi_turn_records": sum(sum(m["role"] == "user" for m in p["prompt"]) > 1 for p in prompts),
    }


def check_reward_fields(path: str, settings: RunConfig, prompts: Sequence[PromptRecord]) -> None:
    """rewards.check_fields on prompt records: each has the fields the run's rewards read (DataError otherwise)."""
    check_fields(path, settings.grpo.rewards,
                 [{"where": p["source"].rpartition(", ")[2], "fields": p["fields"]} for p in prompts])


def encode_prompts(prompts: Sequence[PromptRecord], encoder: BatchEncoder, template: Template,
                   eos_token: str) -> list[tuple[str, list[int]]]:
    """(the prompt's text, its ids) per record: rendered with the generation prompt, encoded as loraft.generate
    encodes a prompt."""
    rendered = []
    for prompt in prompts:
        try:
            rendered.append(template.render(prompt["prompt"], eos_token, add_generation_prompt=True))
        except TemplateError as exc:
            raise DataError(prompt["source"], str(exc)) from None
    rows = encode_rendered(rendered, encoder)
    return [("".join(segment.text for segment in segments), ids) for segments, (ids, _) in zip(rendered, rows)]


def _columns(prompts: Sequence[PromptRecord]) -> dict:
    """The records' fields as columns (None where a record lacks one; text where a field mixes types)."""
    names = sorted({name for prompt in prompts for name in prompt["fields"]})
    columns = {}
    for name in names:
        values = [prompt["fields"].get(name) for prompt in prompts]
        kinds = {type(value) for value in values if value is not None}
        columns[name] = [None if v is None else str(v) for v in values] if len(kinds) > 1 else values
    return columns


def tokenize_prompts(prompts: Sequence[PromptRecord], tokenizer, template: Template, max_length: int,
                     path: str = "the data"):
    """The records as GRPO's dataset: `prompt` (the rendered text), `prompt_ids`, RECORD_COLUMN (where each came
    from) and the records' fields; and the token-level report. A prompt longer than max_length is dropped."""
    from datasets import Dataset

    check_tokenizer(tokenizer)
    encoder = BatchEncoder(tokenizer)
    encoded = [row for start in range(0, len(prompts), ENCODE_BATCH) for row in encode_prompts(
        prompts[start:start + ENCODE_BATCH], encoder, template, tokenizer.eos_token)]
    kept = [(prompt, row) for prompt, row in zip(prompts, encoded) if len(row[1]) <= max_length]
    if prompts and not kept:
        who = "the only prompt is" if len(prompts) == 1 else f"all {len(prompts)} prompts are"
        raise DataError(path, f"{who} longer than data.max_length {max_length} tokens, so none is kept")
    lengths = sorted(len(ids) for _, (_, ids) in kept)
    dropped = len(prompts) - len(kept)
    columns = {"prompt": [text for _, (text, _) in kept], "prompt_ids": [ids for _, (_, ids) in kept],
               RECORD_COLUMN: [prompt["source"] for prompt, _ in kept], **_columns([prompt for prompt, _ in kept])}
    report = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "template": template.name,
        "max_length": max_length, "samples_tokenized": len(prompts), "samples_kept": len(kept),
        "samples": len(kept), "dropped": {DROPPED_LONG_PROMPT: dropped} if dropped else {},
        "tokens": {"prompt": sum(lengths)},
        "length_percentiles": {**{f"p{q}": lengths[-(-len(lengths) * q // 100) - 1] if lengths else 0
                                  for q in (50, 90, 99)}, "max": lengths[-1] if lengths else 0},
    }
    return Dataset.from_dict(columns), report


def prepare_prompts(path: str, settings: RunConfig, tokenizer):
    """Read, check against the rewards, and tokenize a prompt source: (dataset, the full data report)."""
    prompts, report = read_with_report(str(path), settings.data)
    check_reward_fields(str(path), settings, prompts)
    dataset, tokens_report = tokenize_prompts(prompts, tokenizer, get_template(settings.data.template, tokenizer),
                                              settings.data.max_length, path=str(path))
    return dataset, {**report, **tokens_report}


def _cached_prompts(path: str, settings: RunConfig, tokenizer):
    """prepare_prompts through the tokenized-data cache every record kind uses (loraft.tokencache); the rewards'
    fields are part of the key, since the check depends on them."""
    from loraft.tokencache import cached_tokens

    data = settings.data
    variant = "prompts|" + "|".join(f"{r.type}:{r.field}" for r in settings.grpo.rewards)
    return cached_tokens(str(path), data, tokenizer, get_template(data.template, tokenizer),
                         lambda: prepare_prompts(path, settings, tokenizer), variant=variant)


def prepare(config: RunConfig, tokenizer) -> PreparedData:
    """GRPO's train (and eval) prompts and the data report, like loraft.data.prepare_datasets for SFT."""
    data, seed = config.data, config.train.seed
    train, report = _cached_prompts(data.path, config, tokenizer)
    eval_dataset = None
    if data.eval_path:
        eval_dataset, report["eval"] = _cached_prompts(data.eval_path, config, tokenizer)
    elif data.eval_fraction > 0:
        train, eval_dataset, report["eval"] = split_eval(train, data.eval_fraction, seed, data.path)
    report["train_samples"] = len(train)
    report["eval_samples"] = len(eval_dataset) if eval_dataset is not None else 0
    return PreparedData(train=train, eval=eval_dataset, report=report)


# the record-kind interface (loraft.objectives.kinds): KIND, check, preview, format_report, format_sample
def check(path: str, settings: RunConfig, tokenizer=None) -> dict:
    """`loraft data check` for prompt records: every record readable and holding its rewards' fields; with a
    tokenizer also the token-level report (through the cache, as training reads it)."""
    if tokenizer is None:
        prompts, report = read_with_report(str(path), settings.data)
        check_reward_fields(str(path), settings, prompts)
        return report
    return _cached_prompts(path, settings, tokenizer)[1]


def preview(path: str, settings: RunConfig, tokenizer, limit: int) -> list[dict]:
    """The first `limit` prompts kept, as training will sample from them: source, prompt (the rendered text),
    input_ids, tokens, and the fields the rewards read."""
    check_tokenizer(tokenizer)
    prompts = read_with_report(str(path), settings.data)[0][:max(limit, 0) * 4 + 4]
    template = get_template(settings.data.template, tokenizer)
    rows = encode_prompts(prompts, BatchEncoder(tokenizer), template, tokenizer.eos_token)
    samples = []
    for prompt, (text, ids) in zip(prompts, rows):
        if len(ids) > settings.data.max_length:
            continue
        samples.append({"source": prompt["source"], "prompt": text, "input_ids": ids,
                        "tokens": token_pieces(tokenizer, ids), "fields": prompt["fields"]})
        if len(samples) >= limit:
            break
    return samples


def format_sample(sample: dict) -> str:
    """A preview sample as text: a header line, the prompt in ⟦…⟧ (the model writes after it), then the fields."""
    fields = ", ".join(f"{name}={value!r}" for name, value in sample["fields"].items())
    return "\n".join([f"--- {sample['source']} (prompt {len(sample['input_ids'])} tokens)",
                      PROMPT_OPEN + sample["prompt"] + PROMPT_CLOSE] + ([f"fields: {fields}"] if fields else []))


def format_report(report: dict) -> str:
    """The report of check as a few human-readable lines."""
    lines = [f"data:    {report['path']} ({report['source_kind']}, {report['format']} format)",
             f"records: {report['records_read']:,} prompts; {report['multi_turn_records']:,} multi-turn; fields "
             f"passed to the rewards: {', '.join(report['fields']) or 'none'}"]
    if "samples" in report:
        pct = report["length_percentiles"]
        dropped = "".join(f"; {count:,} dropped ({reason})" for reason, count in report.get("dropped", {}).items())
        lines += [f"tokens:  template {report['template']}, max_length {report['max_length']} (the prompt), "
                  f"tokenizer {report['tokenizer']}",
                  f"kept:    {report['samples_kept']:,} prompts{dropped}",
                  f"length:  prompt p50 {pct['p50']}, p90 {pct['p90']}, p99 {pct['p99']}, max {pct['max']}"]
    return "\n".join(lines)


def prompt_lookup(*datasets) -> dict[str, list[int]]:
    """The prompt text -> ids map GRPO's trainer tokenizes prompts with (loraft.objectives.grpo)."""
    lookup: dict[str, list[int]] = {}
    for dataset in datasets:
        if dataset is not None:
            lookup.update(zip(dataset["prompt"], dataset["prompt_ids"]))
    return lookup

