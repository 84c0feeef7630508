"""The data stage: read records (loraft.records), tokenize them with the prompt masked, cache, report.

Tokenization follows the reference `preprocess_function`: each template segment is tokenized on its own
(the first with special tokens), prompt labels are -100, and samples are cut with `[:max_length]`.
A sample with no supervised token left after the cut is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Sequence

from loraft.config import DataConfig, RunConfig
from loraft.errors import DataError, ModelError, TemplateError
from loraft.records import Conversation, load_conversations, load_hub_dataset, read_with_report
from loraft.templates import Segment, Template, get_template

logger = logging.getLogger(__name__)

# Bump when tokenization or the stored columns change, so old cache entries are not reused.
DATA_VERSION = 2
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


class _BatchEncoder:
    """Tokenizes a list of texts exactly as `tokenizer(text, add_special_tokens=...)` does, one call per list.

    tokenizers' Rust `encode_batch_fast` skips transformers' per-call Python work (measured 9 s vs 17.5 s
    for 51k records). The first list of each kind is checked against `tokenizer(...)`, and any difference
    falls back to the transformers call, so the ids are always the tokenizer's own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self.checked: set[bool] = set()

    def __call__(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        if self.encode is not None:
            ids = [encoding.ids for encoding in self.encode(texts, add_special_tokens=add_special_tokens)]
            if add_special_tokens in self.checked:
                return ids
            self.checked.add(add_special_tokens)
            probe = self.tokenizer(texts[:64], add_special_tokens=add_special_tokens)["input_ids"]
            if [list(p) for p in probe] == ids[:64]:
                return ids
            self.encode = None
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def encode_rendered(rendered: Sequence[Sequence[Segment]], encoder: "_BatchEncoder") -> list[tuple[list[int], list[int]]]:
    """The one masked encoder: tokenize each conversation's segments one by one into (input_ids, labels), labels
    -100 on prompt tokens, as the reference recipe tokenizes its prompt and its response separately.

    The first segment gets the tokenizer's special tokens (BOS where the model uses one) unless the template wrote
    the BOS itself (Llama-3's `{{ bos_token }}`): a BOS is never doubled, nor repeated mid-sequence. BLOOM adds no
    special tokens, so this equals the reference's `tokenizer(prompt)` + `tokenizer(response)` exactly.
    """
    bos = getattr(encoder.tokenizer, "bos_token", None)
    own_bos = [bool(bos) and bool(segments) and segments[0].text.startswith(bos) for segments in rendered]
    with_specials = iter(encoder([s[0].text for s, own in zip(rendered, own_bos) if s and not own], True))
    pieces = [s.text for segments, own in zip(rendered, own_bos) for s in (segments if own else segments[1:])]
    without = iter(encoder(pieces, False))
    rows = []
    for segments, own in zip(rendered, own_bos):
        input_ids: list[int] = []
        labels: list[int] = []
        for index, segment in enumerate(segments):
            ids = next(with_specials) if index == 0 and not own else next(without)
            input_ids += ids
            labels += ids if segment.supervised else [-100] * len(ids)
        rows.append((input_ids, labels))
    return rows


def encode_segments(tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
    """One conversation's segments as (input_ids, labels): what generation encodes a prompt with."""
    return encode_rendered([segments], _BatchEncoder(tokenizer))[0]


def _encode(conversations: Sequence[Conversation], encoder: _BatchEncoder, template: Template, eos_token: str,
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
    rows = _encode(conversations, _BatchEncoder(tokenizer), template, tokenizer.eos_token, max_length)
    return {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows], "full_length": [r[2] for r in rows]}


def _check_tokenizer(tokenizer) -> None:
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

    _check_tokenizer(tokenizer)
    if num_proc is not None and num_proc > 1 and len(conversations) > ENCODE_BATCH:
        encoded = Dataset.from_list([{"messages": c["messages"]} for c in conversations]).map(
            _encode_columns, batched=True, batch_size=ENCODE_BATCH, num_proc=num_proc,
            remove_columns=["messages"],
            fn_kwargs={"tokenizer": tokenizer, "template": template, "max_length": max_length},
        ).to_dict()
        rows = zip(encoded["input_ids"], encoded["labels"], encoded["full_length"])
    else:
        encoder = _BatchEncoder(tokenizer)
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


def _require_samples(path: str, samples_kept: int, samples_tokenized: int, max_length: int) -> None:
    if samples_kept == 0:
        who = "the only sample was" if samples_tokenized == 1 else f"all {samples_tokenized} samples were"
        message = f"{who} dropped: no response token left after truncation to max_length {max_length}"
        raise DataError(path, message)


# ------------------------------------------------------------------------------------------ cache


def _cache_root(data: DataConfig) -> Path:
    root = data.cache_dir or os.environ.get("LORAFT_CACHE_DIR") or Path.home() / ".cache" / "loraft" / "tokenized"
    return Path(root).expanduser()


def _source_fingerprint(path: str, data: DataConfig) -> str:
    local = Path(path).expanduser()
    digest = hashlib.sha256()
    if local.is_file():
        with open(local, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    elif local.is_dir():  # save_to_disk shards can be GBs: names, sizes and mtimes identify a save
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(local)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    else:
        digest.update(f"hub|{path}|{data.split}|{load_hub_dataset(path, data)._fingerprint}".encode())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{specials}|{body}".encode()).hexdigest()


def _cache_key(path: str, data: DataConfig, tokenizer, template: Template) -> str:
    fields = {"format", "max_length", "split", "instruction_field", "input_field", "output_field", "system_field",
              "history_field", "messages_field", "system_prompt", "limit"}
    parts = {
        "version": DATA_VERSION, "source": _source_fingerprint(path, data),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        # the Jinja source is the template: an edit to it (or another model's template) is another key
        "template": [template.name, hashlib.sha256(template.jinja.encode()).hexdigest()],
        "data": data.model_dump(include=fields),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _store(entry: Path, dataset, report: dict) -> None:
    """Write a cache entry atomically: it appears whole at once, and a racing writer's copy (another torchrun
    rank that finished first) is kept and this one discarded."""
    from loraft.rundir import staged_directory

    with staged_directory(entry, keep_existing=True) as staging:
        dataset.save_to_disk(str(staging))
        (staging / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")


def _tokenized_source(path: str, data: DataConfig, tokenizer) -> tuple[Any, dict]:
    """Tokenized data and the full report for one source, from the cache when the same inputs were seen."""
    from datasets import load_from_disk

    path = str(path)
    _check_tokenizer(tokenizer)
    template = get_template(data.template, tokenizer)
    entry = _cache_root(data) / _cache_key(path, data, tokenizer, template)
    if (entry / "report.json").exists():
        report = json.loads((entry / "report.json").read_text(encoding="utf-8"))
        hit = {"path": path, "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "cache_hit": True,
               "fingerprint": entry.name}
        return load_from_disk(str(entry)), {**report, **hit}
    conversations, report = read_with_report(path, data)
    dataset, tokens_report = tokenize_conversations(conversations, tokenizer, template, data.max_length, data.num_proc)
    report.update(tokens_report)
    # what the samples depend on (source content, tokenizer, template, max_length, fields): a resume compares it
    report["fingerprint"] = entry.name
    _require_samples(path, report["samples_kept"], report["samples_tokenized"], data.max_length)
    try:
        _store(entry, dataset, report)
    except OSError as exc:
        logger.warning("could not cache tokenized data in %s (%s); continuing without the cache", entry, exc)
        return dataset, {**report, "cache_hit": False}
    return load_from_disk(str(entry)), {**report, "cache_hit": False}


# ------------------------------------------------------------------------------------ entry points


def prepare_datasets(config: RunConfig, tokenizer) -> PreparedData:
    """Tokenized train (and eval) datasets for a run, and the data report for the run directory.

    The eval set comes from data.eval_path, else from a seeded split of data.eval_fraction of the
    tokenized training samples. Under torchrun, call it inside main_process_first; the cache is race-safe.
    """
    import numpy as np

    data = config.data
    train, report = _tokenized_source(data.path, data, tokenizer)
    answers = report.get("roles", {}).get("assistant", 0)
    if answers and report.get("empty_outputs") == answers and not data.allow_empty_responses:
        # every sample would teach only the end token: refused before any model is loaded
        raise DataError(data.path, f"every response is empty ({answers} of {answers}), so training would only "
                        "teach the model to stop; set data.allow_empty_responses=true if that is intended")
    eval_dataset = None
    if data.eval_path:
        eval_dataset, report["eval"] = _tokenized_source(data.eval_path, data, tokenizer)
    elif data.eval_fraction > 0:
        eval_count = int(-(-len(train) * data.eval_fraction // 1))
        if eval_count >= len(train):
            message = f"eval_fraction {data.eval_fraction} of {len(train)} samples leaves none to train on"
            raise DataError(data.path, message)
        # Our own seeded permutation: train_test_split on a cached dataset writes index files into the
        # shared cache entry, and refuses keep_in_memory=True there (datasets 5.2).
        order = np.random.default_rng(config.train.seed).permutation(len(train))
        eval_dataset = train.select(order[:eval_count], keep_in_memory=True)
        train = train.select(order[eval_count:], keep_in_memory=True)
        report["eval"] = {
            "source": "eval_fraction", "eval_fraction": data.eval_fraction, "seed": config.train.seed,
            "samples_kept": eval_count,
        }
    report["train_samples"] = len(train)
    report["eval_samples"] = len(eval_dataset) if eval_dataset is not None else 0
    return PreparedData(train=train, eval=eval_dataset, report=report)


def check_data(path: str, data: DataConfig, tokenizer=None) -> dict:
    """Validate a data source and report on it; with a tokenizer also tokenize it (through the cache)."""
    if tokenizer is None:
        return read_with_report(str(path), data)[1]
    return _tokenized_source(str(path), data, tokenizer)[1]


def preview_samples(path: str, data: DataConfig, tokenizer, limit: int) -> list[dict]:
    """The first `limit` kept samples, in source order, exactly as training sees them.

    Returns:
        dicts with source, text, input_ids, attention_mask, labels. `text` decodes input_ids run by run
        and wraps prompt (label -100) runs in ⟦…⟧; text outside the brackets is supervised.
    """
    _check_tokenizer(tokenizer)
    conversations = load_conversations(str(path), data)
    template = get_template(data.template, tokenizer)
    encoder = _BatchEncoder(tokenizer)
    samples: list[dict] = []
    step = max(limit, 64)
    for start in range(0, len(conversations), step):
        if len(samples) >= limit:
            break
        chunk = conversations[start:start + step]
        for conversation, (input_ids, labels, _) in zip(
            chunk, _encode(chunk, encoder, template, tokenizer.eos_token, data.max_length)
        ):
            if len(samples) < limit and labels.count(-100) < len(labels):
                samples.append({
                    "source": conversation["source"], "text": _marked_text(tokenizer, input_ids, labels),
                    "input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
                })
    if limit > 0:
        _require_samples(str(path), len(samples), len(conversations), data.max_length)
    return samples


def _marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
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
