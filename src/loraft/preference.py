"""Preference data (DPO pairs, KTO unpaired completions) tokenized into TRL's columns, with SFT's masks.

Each side (chosen, rejected, or a KTO completion) is the SFT conversation `prompt + [assistant: side]`, rendered by
the template and encoded by the one masked encoder (loraft.encode) exactly as `data.tokenize_conversations` encodes
it. The side's last supervised run (the assistant's content and its end-of-turn token) is the completion; every
token before it is the prompt (earlier assistant turns included: in a pair they are context). What a template
writes after the end-of-turn (ChatML's "\\n") belongs to neither, as SFT labels it -100 (TRL's own tokenize_fn,
which takes all after the prompt, would score it too). So over `prompt_ids + chosen_ids` TRL's completion_mask is
exactly where SFT's labels for that answer are not -100.

The columns are what TRL 1.16 builds from text in `DPOTrainer._prepare_dataset` (its `tokenize_fn`: prompt_ids,
chosen_ids, rejected_ids) and `KTOTrainer._prepare_dataset` (prompt_ids, completion_ids, with the dataset's label),
and what `DataCollatorForPreference` / `DataCollatorForUnpairedPreference` read (trl/trainer/dpo_trainer.py,
trl/trainer/kto_trainer.py). Those trainers run `_prepare_dataset` on any text dataset, and it wants a `prompt`
text column, so training hands these columns past it, to the collators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from loraft.config import DataConfig, PreferenceConfig, RunConfig
from loraft.data import (DROPPED_NO_RESPONSE, PROMPT_CLOSE, PROMPT_OPEN, PreparedData, cached_tokens,
                         check_tokenizer, marked_text, require_samples, split_eval, token_pieces)
from loraft.encode import BatchEncoder, encode_rendered
from loraft.errors import DataError, TemplateError
from loraft.records import PAIRED_FIELDS, Preference, read_preferences_with_report
from loraft.templates import Template, get_template

# the record-kind interface (loraft.objectives.kinds): KIND, check, preview, format_report, format_sample
KIND = "preferences"
PAIRED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")
ENCODE_BATCH = 500  # pairs rendered and tokenized per call (two sequences each)


@dataclass
class EncodedPreference:
    """One record's token ids after truncation, and the lengths before it."""

    prompt_ids: list[int]
    completions: dict[str, list[int]]  # side ("chosen", "rejected" or "completion") -> ids
    prompt_length: int  # before preference.max_prompt_length
    completion_lengths: dict[str, int]  # before the cut


def sides(preference: Preference) -> tuple[str, ...]:
    """The completions of a record: chosen and rejected, or the one KTO completion."""
    return PAIRED_FIELDS if "chosen" in preference else ("completion",)


def _last_run(labels: list[int]) -> tuple[int, int]:
    """Start and end of the last run of supervised labels: the final assistant turn's tokens."""
    end = len(labels)
    while end and labels[end - 1] == -100:
        end -= 1
    start = end
    while start and labels[start - 1] != -100:
        start -= 1
    return start, end


def _truncate(prompt_ids: list[int], completions: dict[str, list[int]], max_length: int,
              limits: PreferenceConfig) -> Optional[EncodedPreference]:
    """The record cut to max_length by the rule every objective follows (loraft.data): keep the start, and drop
    (None) a record with no supervised token left, here a prompt that leaves no room for the completion.

    TRL 1.16's collators cut prompt + completion to max_length keeping the start (truncation_mode "keep_start",
    the default and the only mode its DPOConfig still supports), and its `_prepare_dataset` drops a record whose
    prompt alone fills max_length; loraft cuts the same tokens here, so the collator's cut with the same max_length
    changes nothing, and counts the drops in the report. preference.max_prompt_length keeps a long prompt's end
    first, as TRL 0.x's max_prompt_length did.
    """
    prompt_length = len(prompt_ids)
    if limits.max_prompt_length is not None and prompt_length > limits.max_prompt_length:
        prompt_ids = prompt_ids[-limits.max_prompt_length:]
    if len(prompt_ids) >= max_length:
        return None
    room = max_length - len(prompt_ids)
    if limits.max_completion_length is not None:
        room = min(room, limits.max_completion_length)
    return EncodedPreference(prompt_ids, {side: ids[:room] for side, ids in completions.items()}, prompt_length,
                             {side: len(ids) for side, ids in completions.items()})


def encode_preferences(preferences: Sequence[Preference], encoder: BatchEncoder, template: Template, eos_token: str,
                       max_length: int, limits: PreferenceConfig) -> list[Optional[EncodedPreference]]:
    """Prompt and completion ids of each record, cut to max_length (see the module docstring); None for a record
    dropped by the cut (_truncate).

    Raises:
        DataError: naming the record: the template fails on it, or renders its prompt differently before chosen
            and rejected.
    """
    rendered = []
    for preference in preferences:
        for side in sides(preference):
            try:
                rendered.append(template.render(preference["prompt"] + [
                    {"role": "assistant", "content": preference[side]}], eos_token))
            except TemplateError as exc:
                raise DataError(preference["source"], str(exc)) from None
    rows = iter(encode_rendered(rendered, encoder))
    encoded = []
    for preference in preferences:
        prompt_ids: Optional[list[int]] = None
        completions = {}
        for side in sides(preference):
            input_ids, labels = next(rows)
            start, end = _last_run(labels)
            if prompt_ids is not None and input_ids[:start] != prompt_ids:
                raise DataError(preference["source"], f"template {template.name} renders the prompt differently "
                                "before chosen and before rejected, so the pair has no common prompt")
            prompt_ids = input_ids[:start]
            completions[side] = input_ids[start:end]
        encoded.append(_truncate(prompt_ids, completions, max_length, limits))
    return encoded


def _encode_all(preferences: Sequence[Preference], tokenizer, template: Template, max_length: int,
                limits: PreferenceConfig) -> list[Optional[EncodedPreference]]:
    check_tokenizer(tokenizer)
    encoder = BatchEncoder(tokenizer)
    return [row for start in range(0, len(preferences), ENCODE_BATCH) for row in encode_preferences(
        preferences[start:start + ENCODE_BATCH], encoder, template, tokenizer.eos_token, max_length, limits)]


def tokenize_preferences(preferences: Sequence[Preference], tokenizer, template: Template, max_length: int,
                         limits: Optional[PreferenceConfig] = None, path: str = "the data"):
    """Tokenize preference records into the columns TRL 1.16's trainers take.

    Args:
        preferences: from records.load_preferences, all paired or all unpaired.
        max_length: data.max_length, TRL's max_length: prompt + each completion.
        limits: the config's `preference` section (default: both limits off).
    Returns:
        (datasets.Dataset with PAIRED_COLUMNS or UNPAIRED_COLUMNS, token-level report dict).
    """
    from datasets import Dataset

    limits = limits or PreferenceConfig()
    everything = _encode_all(preferences, tokenizer, template, max_length, limits)
    kept = [(preference, row) for preference, row in zip(preferences, everything) if row is not None]
    dropped = len(everything) - len(kept)
    if preferences:
        require_samples(path, len(kept), len(everything), max_length)
    encoded = [row for _, row in kept]
    names = sides(preferences[0]) if preferences else ()
    columns = {"prompt_ids": [row.prompt_ids for row in encoded]}
    for side in names:
        columns[f"{side}_ids"] = [row.completions[side] for row in encoded]
    if preferences and "label" in preferences[0]:
        columns["label"] = [preference["label"] for preference, _ in kept]
    longest = sorted(len(row.prompt_ids) + max(map(len, row.completions.values())) for row in encoded)
    # Nearest-rank percentiles of the longest sequence of each record (the one memory depends on).
    percentiles = {f"p{q}": longest[-(-len(longest) * q // 100) - 1] if longest else 0 for q in (50, 90, 99)}
    report = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "template": template.name,
        "max_length": max_length, "max_prompt_length": limits.max_prompt_length,
        "max_completion_length": limits.max_completion_length, "samples": len(encoded),
        # the names and the rule SFT's report uses (loraft.data): kept, and dropped by reason
        "samples_tokenized": len(everything), "samples_kept": len(encoded),
        "dropped": {DROPPED_NO_RESPONSE: dropped} if dropped else {},
        "truncated_prompts": sum(row.prompt_length > len(row.prompt_ids) for row in encoded),
        "truncated_completions": {side: sum(row.completion_lengths[side] > len(row.completions[side])
                                            for row in encoded) for side in names},
        "tokens": {"prompt": sum(len(row.prompt_ids) for row in encoded),
                   **{side: sum(len(row.completions[side]) for row in encoded) for side in names}},
        "length_percentiles": {**percentiles, "max": longest[-1] if longest else 0},
    }
    return Dataset.from_dict(columns), report


def prepare_preferences(path: str, data: DataConfig, tokenizer, limits: Optional[PreferenceConfig] = None):
    """Read, validate and tokenize a preference source: (dataset in TRL's columns, the full data report)."""
    preferences, report = read_preferences_with_report(str(path), data)
    dataset, tokens_report = tokenize_preferences(preferences, tokenizer, get_template(data.template, tokenizer),
                                                  data.max_length, limits, path=str(path))
    return dataset, {**report, **tokens_report}


def _cached_preferences(path: str, data: DataConfig, tokenizer, limits: PreferenceConfig):
    """prepare_preferences through the tokenized-data cache every record kind uses (loraft.data.cached_tokens):
    under torchrun rank 0 tokenizes and the other ranks read its entry. Returns (dataset, report with
    `fingerprint`)."""
    return cached_tokens(str(path), data, tokenizer, get_template(data.template, tokenizer),
                         lambda: prepare_preferences(path, data, tokenizer, limits),
                         variant=f"{limits.max_prompt_length}|{limits.max_completion_length}")


def prepare(config: RunConfig, tokenizer, columns: Callable) -> PreparedData:
    """Tokenized train (and eval) preference data for a run, and the data report (its `fingerprint` is what a
    resume compares), like loraft.data.prepare for conversations.

    Args:
        columns: the objective's `columns(dataset, report, path, seed)`: the dataset in its trainer's columns
            (loraft.objectives), or one sentence naming the file when the records do not suit it.
    Raises:
        DataError: a bad record (file, record, field), or records the objective cannot train on.
    """
    data, limits, seed = config.data, config.preference, config.train.seed
    train, report = _cached_preferences(data.path, data, tokenizer, limits)
    if len(train) == 0:
        raise DataError(data.path, "holds no preference records")
    eval_dataset = None
    if data.eval_path:
        eval_dataset, report["eval"] = _cached_preferences(data.eval_path, data, tokenizer, limits)
        eval_dataset = columns(eval_dataset, report["eval"], data.eval_path, seed)
    elif data.eval_fraction > 0:
        train, eval_dataset, report["eval"] = split_eval(train, data.eval_fraction, seed, data.path)
        eval_dataset = columns(eval_dataset, report["eval"], data.path, seed)
    train = columns(train, report, data.path, seed)
    report["train_samples"] = len(train)
    report["eval_samples"] = len(eval_dataset) if eval_dataset is not None else 0
    return PreparedData(train=train, eval=eval_dataset, report=report)


def check(path: str, settings: RunConfig, tokenizer=None) -> dict:
    """`loraft data check` for preference records: the record-level report, with a tokenizer also the token-level
    one (through the cache, as training reads it)."""
    if tokenizer is None:
        return read_preferences_with_report(str(path), settings.data)[1]
    return _cached_preferences(path, settings.data, tokenizer, settings.preference)[1]


def preview(path: str, settings: RunConfig, tokenizer, limit: int) -> list[dict]:
    """The first `limit` records kept, as training will see them (a record the cut drops is skipped, as in
    loraft.data.preview).

    Returns:
        dicts with source, prompt (its text), prompt_length (before preference.max_prompt_length), prompt_truncated,
        and per side ("chosen" and "rejected", or "completion" and a "label") what preview_samples gives a sample:
        text (prompt in ⟦…⟧, then the supervised completion), completion (its text), input_ids, attention_mask,
        labels, tokens, full_length (before any cut) and truncated.
    """
    check_tokenizer(tokenizer)
    data = settings.data
    preferences = read_preferences_with_report(str(path), data)[0]
    template, encoder = get_template(data.template, tokenizer), BatchEncoder(tokenizer)
    kept: list[tuple[Preference, EncodedPreference]] = []
    for start in range(0, len(preferences), max(limit, 64)):
        if len(kept) >= limit:
            break
        chunk = preferences[start:start + max(limit, 64)]
        rows = encode_preferences(chunk, encoder, template, tokenizer.eos_token, data.max_length, settings.preference)
        kept += [(preference, row) for preference, row in zip(chunk, rows) if row is not None]
    if limit > 0:
        require_samples(str(path), len(kept), len(preferences), data.max_length)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    samples = []
    for preference, row in kept[:max(limit, 0)]:
        sample = {"source": preference["source"], "prompt": decode(row.prompt_ids),
                  "prompt_length": row.prompt_length, "prompt_truncated": row.prompt_length > len(row.prompt_ids)}
        for side, completion in row.completions.items():
            input_ids = row.prompt_ids + completion
            labels = [-100] * len(row.prompt_ids) + completion
            full_length = row.prompt_length + row.completion_lengths[side]
            sample[side] = {
                "text": marked_text(tokenizer, input_ids, labels), "completion": decode(completion),
                "input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
                "tokens": token_pieces(tokenizer, input_ids), "full_length": full_length,
                "truncated": full_length > len(input_ids),
            }
        if "label" in preference:
            sample["label"] = preference["label"]
        samples.append(sample)
    return samples


def format_sample(sample: dict) -> str:
    """A preview sample as text: a header line, the prompt in ⟦…⟧, then each completion on a line of its own."""
    names = [side for side in ("chosen", "rejected", "completion") if side in sample]
    prompt_tokens = sample[names[0]]["labels"].count(-100)
    cut = f", cut from {sample['prompt_length']}" if sample["prompt_truncated"] else ""
    supervised = ", ".join(f"{side} {len(sample[side]['labels']) - prompt_tokens}" for side in names)
    label = {True: "; label: desirable", False: "; label: undesirable"}.get(sample.get("label"), "")
    lines = [f"--- {sample['source']} (prompt {prompt_tokens} tokens{cut}; supervised: {supervised}{label})",
             PROMPT_OPEN + sample["prompt"] + PROMPT_CLOSE]
    width = max(map(len, names)) + 2
    return "\n".join(lines + [f"{side + ':':{width}}{sample[side]['completion']}" for side in names])


def format_report(report: dict) -> str:
    """The report of check as a few human-readable lines."""
    lines = [f"data:    {report['path']} ({report['source_kind']}, {report['format']} format)"]
    if "labels" in report:
        labels = report["labels"]
        what = f"{labels['desirable']:,} desirable, {labels['undesirable']:,} undesirable completions"
    else:
        what = f"{report['records_read']:,} chosen/rejected pairs"
    lines.append(f"records: {report['records_read']:,} read: {what}; {report['multi_turn_records']:,} multi-turn "
                 "prompts")
    if "samples" in report:
        def limit(value) -> str:
            return "none" if value is None else str(value)

        cut = ", ".join(f"{count:,} {side}" for side, count in report["truncated_completions"].items())
        tokens = ", ".join(f"{count:,} {part}" for part, count in report["tokens"].items())
        pct = report["length_percentiles"]
        lines += [
            f"tokens:  template {report['template']}, max_length {report['max_length']}, max_prompt_length "
            f"{limit(report['max_prompt_length'])}, max_completion_length {limit(report['max_completion_length'])}, "
            f"tokenizer {report['tokenizer']}",
            f"cut:     {report['truncated_prompts']:,} prompts; completions: {cut}"
            + "".join(f"; {count:,} records dropped ({reason})" for reason, count in report.get("dropped", {}).items()),
            f"tokens:  {tokens}",
            f"length:  prompt + longest completion: p50 {pct['p50']}, p90 {pct['p90']}, p99 {pct['p99']}, "
            f"max {pct['max']}",
        ]
    return "\n".join(lines)
