"""The data stage: read records (loraft.records), tokenize them with the prompt masked, cache, report.

Tokenization follows the reference `preprocess_function` through the one masked encoder (loraft.encode): each
template segment is tokenized on its own (the first with special tokens), prompt labels are -100, and samples are
cut here with `[:max_length]`.
A sample with no supervised token left after the cut is dropped and counted.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from itertools import chain
from typing import Any, Optional, Sequence

from loraft.config import DataConfig, RunConfig
from loraft.encode import BatchEncoder, encode_rendered
from loraft.errors import DataError, ModelError, TemplateError
from loraft.records import Conversation, load_conversations, read_with_report
from loraft.tokencache import cached_tokens
from loraft.templates import Template, get_template

logger = logging.getLogger(__name__)

DROPPED_NO_RESPONSE = "no_response_token_after_truncation"
# preview_samples wraps prompt (label -100) text in these brackets; text outside them is supervised.
PROMPT_OPEN, PROMPT_CLOSE = "⟦", "⟧"
ENCODE_BATCH = 1000



@dataclass
class PreparedData:
    """Tokenized datasets (columns input_ids, attention_mask, labels, length) and the data report."""

    train: Any  # datasets.Dataset
    eval: Optional[Any]
    report: dict


# ------------------------------------------------------------------------------------- tokenizing


def _encode(conversations: Sequence[Conversation], encoder: BatchEncoder, template: Template, eos_token: str,
            max_length: int) -> list[tuple[list[int], list[int], int]]:
    """Tokenize conversations into (input_ids, labels, untruncated length), cut to max_length."""
    rendered = []
    for conversation in conversations:
        try:
            rendered.append(template.render(conversation["messages"], eos_token))
        except TemplateError as exc:
            raise DataError(conversation.get("source", "a record"), str(exc)) from None
    return [(ids[:max_length], labels[:max_length], len(ids)) for ids, labels in encode_rendered(rendered, encoder)]


def _encode_columns(batch: dict, tokenizer, template: Template, max_length: int) -> dict:
    """The datasets.map worker used when num_proc > 1."""
    conversations = [{"messages": messages} for messages in batch["messages"]]
    rows = _encode(conversations, BatchEncoder(tokenizer), template, tokenizer.eos_token, max_length)
    return {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows], "full_length": [r[2] for r in rows]}


def check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer without an EOS token (ModelError): every template ends an answer with it."""
    if tokenizer.eos_token is None:
        raise ModelError("the tokenizer has no eos_token; templates end every response with it")


def tokenize_conversations(conversations: Sequence[Conversation], tokenizer, template: Template, max_length: int,
                           num_proc: Optional[int] = None):
    """Tokenize conversations with prompt labels masked, cut to max_length, drop samples left unsupervised.

    Args:
        num_proc: > 1 tokenizes in that many datasets.map worker processes; None or 1 tokenizes here,
            where a fast tokenizer already spreads each batch over all cores in Rust.
    Returns:
        (datasets.Dataset with input_ids, attention_mask, labels, length; token-level report dict).
    """
    from datasets import Dataset

    check_tokenizer(tokenizer)
    if num_proc is not None and num_proc > 1 and len(conversations) > ENCODE_BATCH:
        encoded = Dataset.from_list([{"messages": c["messages"]} for c in conversations]).map(
            _encode_columns, batched=True, batch_size=ENCODE_BATCH, num_proc=num_proc,
            remove_columns=["messages"],
            fn_kwargs={"tokenizer": tokenizer, "template": template, "max_length": max_length},
        ).to_dict()
        rows = zip(encoded["input_ids"], encoded["labels"], encoded["full_length"])
    else:
        encoder = BatchEncoder(tokenizer)
        batches = (conversations[i:i + ENCODE_BATCH] for i in range(0, len(conversations), ENCODE_BATCH))
        rows = (row for batch in batches for row in _encode(batch, encoder, template, tokenizer.eos_token, max_length))
    kept_ids: list[list[int]] = []
    kept_labels: list[list[int]] = []
    truncated = dropped = supervised_tokens = 0
    for input_ids, labels, full_length in rows:
        truncated += full_length > max_length
        supervised = len(labels) - labels.count(-100)
        if supervised == 0:
            dropped += 1
            continue
        supervised_tokens += supervised
        kept_ids.append(input_ids)
        kept_labels.append(labels)
    lengths = sorted(map(len, kept_ids))
    total = sum(lengths)
    # Nearest-rank percentiles of the kept lengths.
    percentiles = {f"p{q}": lengths[-(-len(lengths) * q // 100) - 1] if lengths else 0 for q in (50, 90, 99)}
    report = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "template": template.name,
        "max_length": max_length, "samples_tokenized": len(conversations), "samples_kept": len(lengths),
        "dropped": {DROPPED_NO_RESPONSE: dropped} if dropped else {}, "truncated_samples": truncated,
        "tokens": {"total": total, "supervised": supervised_tokens, "prompt": total - supervised_tokens},
        "length_percentiles": {**percentiles, "max": lengths[-1] if lengths else 0},
    }
    return _to_dataset(kept_ids, kept_labels), report


def _to_dataset(input_ids: list[list[int]], labels: list[list[int]]):
    """Build the Arrow columns directly; for 51k samples, datasets.from_dict's per-row encoding and content
    hashing of the in-memory table took 4 of 14 s, so the table gets a random fingerprint instead."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, Features, List, Value
    from datasets.table import InMemoryTable

    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    total = int(lengths.sum())

    def column(rows: list[list[int]]) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total))

    table = pa.table({
        "input_ids": column(input_ids),
        "attention_mask": pa.ListArray.from_arrays(offsets, np.ones(total, dtype=np.int64)),
        "labels": column(labels),
        "length": pa.array(lengths),
    })
    features = Features({name: List(Value("int64")) for name in ("input_ids", "attention_mask", "labels")})
    features["length"] = Value("int64")
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features), fingerprint=uuid.uuid4().hex[:16])


def require_samples(path: str, samples_kept: int, samples_tokenized: int, max_length: int) -> None:
    if samples_kept == 0:
        who = "the only sample was" if samples_tokenized == 1 else f"all {samples_tokenized} samples were"
        message = f"{who} dropped: no response token left after truncation to max_length {max_length}"
        raise DataError(path, message)


def validate_source(path: str, report: dict, data: DataConfig) -> None:
    """The checks a training source must pass: `loraft train` (prepare_datasets) and `loraft data check`
    (check_data) both run exactly these, so both refuse the same data with the same sentence.

    Raises:
        DataError: no sample keeps a supervised token (when the report is tokenized), or every response is
            empty and data.allow_empty_responses is off.
    """
    if "samples_kept" in report:
        require_samples(path, report["samples_kept"], report["samples_tokenized"], data.max_length)
    answers = report.get("roles", {}).get("assistant", 0)
    if answers and report.get("empty_outputs") == answers and not data.allow_empty_responses:
        # every sample would teach only the end token: refused before any model is loaded
        raise DataError(path, f"every response is empty ({answers} of {answers}), so training would only "
                        "teach the model to stop; set data.allow_empty_responses=true if that is intended")


def _tokenized_source(path: str, data: DataConfig, tokenizer) -> tuple[Any, dict]:
    """Tokenized conversations and the full report for one source, through the cache."""
    path = str(path)
    check_tokenizer(tokenizer)
    template = get_template(data.template, tokenizer)

    def build():
        conversations, report = read_with_report(path, data)
        dataset, tokens_report = tokenize_conversations(conversations, tokenizer, template, data.max_length,
                                                        data.num_proc)
        report.update(tokens_report)
        require_samples(path, report["samples_kept"], report["samples_tokenized"], data.max_length)
        return dataset, report

    return cached_tokens(path, data, tokenizer, template, build)


# ------------------------------------------------------------------------------------ entry points


def split_eval(train, fraction: float, seed: int, path: str):
    """A seeded split of `fraction` of the tokenized samples for evaluation: (train, eval, the report's eval entry)."""
    import numpy as np

    eval_count = int(-(-len(train) * fraction // 1))
    if eval_count >= len(train):
        raise DataError(path, f"eval_fraction {fraction} of {len(train)} samples leaves none to train on")
    # Our own seeded permutation: train_test_split on a cached dataset writes index files into the
    # shared cache entry, and refuses keep_in_memory=True there (datasets 5.2).
    order = np.random.default_rng(seed).permutation(len(train))
    eval_dataset = train.select(order[:eval_count], keep_in_memory=True)
    train = train.select(order[eval_count:], keep_in_memory=True)
    entry = {"source": "eval_fraction", "eval_fraction": fraction, "seed": seed, "samples_kept": eval_count}
    return train, eval_dataset, entry


def prepare_datasets(config: RunConfig, tokenizer) -> PreparedData:
    """Tokenized train (and eval) datasets for a run, and the data report for the run directory.

    The eval set comes from data.eval_path, else from a seeded split of data.eval_fraction of the
    tokenized training samples. Under torchrun, call it inside main_process_first; the cache is race-safe.
    """
    data = config.data
    train, report = _tokenized_source(data.path, data, tokenizer)
    validate_source(data.path, report, data)
    eval_dataset = None
    if data.eval_path:
        eval_dataset, report["eval"] = _tokenized_source(data.eval_path, data, tokenizer)
    elif data.eval_fraction > 0:
        train, eval_dataset, report["eval"] = split_eval(train, data.eval_fraction, config.train.seed, data.path)
    report["train_samples"] = len(train)
    report["eval_samples"] = len(eval_dataset) if eval_dataset is not None else 0
    return PreparedData(train=train, eval=eval_dataset, report=report)


def check_data(path: str, data: DataConfig, tokenizer=None) -> dict:
    """Validate a data source as training would (validate_source) and report on it; with a tokenizer also
    tokenize it (through the cache)."""
    path = str(path)
    report = read_with_report(path, data)[1] if tokenizer is None else _tokenized_source(path, data, tokenizer)[1]
    validate_source(path, report, data)
    return report


# the record-kind interface (loraft.objectives.kinds): KIND, check, preview, format_report, format_sample
KIND = "conversations"


def check(path: str, settings: RunConfig, tokenizer=None) -> dict:
    """`loraft data check` for conversation records (check_data)."""
    return check_data(path, settings.data, tokenizer)


def preview(path: str, settings: RunConfig, tokenizer, limit: int) -> list[dict]:
    """`loraft data preview` for conversation records (preview_samples)."""
    return preview_samples(path, settings.data, tokenizer, limit)


def format_sample(sample: dict) -> str:
    """A preview sample as text: a header line, then the sample with its prompt in ⟦…⟧."""
    supervised = sum(1 for label in sample["labels"] if label != -100)
    return (f"--- {sample['source']} ({len(sample['input_ids'])} tokens, {supervised} supervised)\n"
            + sample["text"])


def preview_samples(path: str, data: DataConfig, tokenizer, limit: int) -> list[dict]:
    """The first `limit` kept samples, in source order, exactly as training sees them.

    Returns:
        dicts with source, text, input_ids, attention_mask, labels, tokens, full_length, truncated. `text` decodes
        input_ids run by run and wraps prompt (label -100) runs in ⟦…⟧; text outside the brackets is supervised.
        `tokens` has one {"text", "special"} per id (token_pieces); `full_length` is the length before the cut to
        data.max_length, `truncated` whether the cut removed tokens.
    """
    check_tokenizer(tokenizer)
    conversations = load_conversations(str(path), data)
    template = get_template(data.template, tokenizer)
    encoder = BatchEncoder(tokenizer)
    samples: list[dict] = []
    step = max(limit, 64)
    for start in range(0, len(conversations), step):
        if len(samples) >= limit:
            break
        chunk = conversations[start:start + step]
        for conversation, (input_ids, labels, full_length) in zip(
            chunk, _encode(chunk, encoder, template, tokenizer.eos_token, data.max_length)
        ):
            if len(samples) < limit and labels.count(-100) < len(labels):
                samples.append({
                    "source": conversation["source"], "text": marked_text(tokenizer, input_ids, labels),
                    "input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
                    "tokens": token_pieces(tokenizer, input_ids), "full_length": full_length,
                    "truncated": full_length > len(input_ids),
                })
    if limit > 0:
        require_samples(str(path), len(samples), len(conversations), data.max_length)
    return samples


def token_pieces(tokenizer, input_ids: list[int], context: int = 8) -> list[dict]:
    """The text each token adds, for showing a sample token by token: [{"text", "special"}] per id.

    A token's text is what decoding it adds after the `context` tokens before it (decoding one token alone loses
    SentencePiece's leading space). A byte-level token that ends inside a multi-byte character adds "" and the
    token completing the character carries all of it, so the pieces join to the decoded text.
    """
    special_ids = set(tokenizer.all_special_ids)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces = []
    for index, token in enumerate(input_ids):
        start = max(0, index - context)
        # an incomplete character at the end decodes to U+FFFD: the token that completes it carries it
        before = decode(input_ids[start:index]).rstrip("\ufffd")
        through = decode(input_ids[start:index + 1])
        if index + 1 < len(input_ids):
            through = through.rstrip("\ufffd")
        common = 0
        while common < min(len(before), len(through)) and before[common] == through[common]:
            common += 1
        pieces.append({"text": through[common:], "special": token in special_ids})
    return pieces


def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """input_ids decoded run by run, prompt (label -100) runs wrapped in ⟦…⟧."""
    pieces, run, run_is_prompt = [], [], None
    for token, label in zip(input_ids + [None], labels + [None]):
        is_prompt = None if token is None else label == -100
        if run and is_prompt != run_is_prompt:
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(PROMPT_OPEN + text + PROMPT_CLOSE if run_is_prompt else text)
            run = []
        run.append(token)
        run_is_prompt = is_prompt
    return "".join(pieces)


def format_report(report: dict) -> str:
    """The report as a few human-readable lines."""
    roles, lines = report["roles"], [f"data:    {report['path']} ({report['source_kind']}, {report['format']} format)"]
    lines.append(f"records: {report['records_read']:,} read; turns: {roles['system']:,} system, "
                 f"{roles['user']:,} user, {roles['assistant']:,} assistant; {report['empty_outputs']:,} empty "
                 f"outputs; {report['multi_turn_records']:,} multi-turn records")
    if "samples_kept" in report:
        tokens, pct = report["tokens"], report["length_percentiles"]
        dropped = ", ".join(f"{count:,} {reason.replace('_', ' ')}" for reason, count in report["dropped"].items())
        lines += [
            f"tokens:  template {report['template']}, max_length {report['max_length']}, "
            f"tokenizer {report['tokenizer']}",
            f"samples: {report['samples_kept']:,} kept, dropped: {dropped or 'none'}; "
            f"{report['truncated_samples']:,} truncated to max_length",
            f"tokens:  {tokens['total']:,} total, {tokens['supervised']:,} supervised "
            f"({tokens['supervised'] / max(tokens['total'], 1):.0%}), {tokens['prompt']:,} prompt",
            f"length:  p50 {pct['p50']}, p90 {pct['p90']}, p99 {pct['p99']}, max {pct['max']}",
        ]
    if report.get("eval"):
        origin = report["eval"].get("path") or f"{report['eval']['eval_fraction']:g} of the training samples"
        lines.append(f"eval:    {report['eval']['samples_kept']:,} samples from {origin}")
    return "\n".join(lines)
