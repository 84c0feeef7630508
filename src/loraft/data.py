"""The data stage: read records, validate them, tokenize them with the prompt masked, cache, report.

Sources: a `datasets.save_to_disk` directory (what the reference recipe loads), a .json (array), .jsonl,
.csv or .parquet file, or a hub dataset id. Record formats (auto-detected from the first record):
alpaca (instruction / input / output, optional system and history), messages ({role, content} list) and
sharegpt ({from, value} list under `conversations`). Every record becomes a Conversation:
`{"messages": [{"role", "content"}, ...], "source": "<file>, line 3"}` ("record 3" where there are no lines).

Tokenization follows the reference `preprocess_function`: each template segment is tokenized on its own
(the first with special tokens), prompt labels are -100, and samples are cut with `[:max_length]`.
A sample with no supervised token left after the cut is dropped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Sequence

from loraft.config import DataConfig, RunConfig
from loraft.errors import DataError, ModelError
from loraft.templates import Template, get_template

logger = logging.getLogger(__name__)

# Bump when tokenization or the stored columns change, so old cache entries are not reused.
DATA_VERSION = 1
DROPPED_NO_RESPONSE = "no_response_token_after_truncation"
# preview_samples wraps prompt (label -100) text in these brackets; text outside them is supervised.
PROMPT_OPEN, PROMPT_CLOSE = "⟦", "⟧"
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_FIELD = "conversations"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
FILE_KINDS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
ENCODE_BATCH = 1000

Conversation = dict  # {"messages": [{"role": str, "content": str}, ...], "source": "<file>, line 3"}
Records = list  # [(where, record)] with where "line N" or "record N", 1-based


@dataclass
class PreparedData:
    """Tokenized datasets (columns input_ids, attention_mask, labels, length) and the data report."""

    train: Any  # datasets.Dataset
    eval: Optional[Any]
    report: dict


# ----------------------------------------------------------------------------------------- reading


def _describe(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"a number ({value})"
    names = {type(None): "null", bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _fields(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"


def _decode_utf8(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = "line " + str(raw[: exc.start].count(b"\n") + 1)
        message = f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        raise DataError(path, message, where) from None


def _json_error(path: str, exc: json.JSONDecodeError, line: int) -> DataError:
    return DataError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", where=f"line {line}")


def _read_jsonl(path: str, text: str, limit: Optional[int]) -> Records:
    records = []
    # Split on "\n" only: str.splitlines would also break at a U+2028 inside an unescaped JSON string.
    for line_number, line in enumerate(text.split("\n"), 1):
        if limit is not None and len(records) >= limit:
            break
        if line.strip():
            try:
                records.append((f"line {line_number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise _json_error(path, exc, line_number) from None
    return records


def _read_json(path: str, text: str, limit: Optional[int]) -> Records:
    if not text.strip():
        return []
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json is common: read it as such when that works
            try:
                return _read_jsonl(path, text, limit)
            except DataError:
                pass
        raise _json_error(path, exc, exc.lineno) from None
    if not isinstance(loaded, list):
        raise DataError(path, f"a .json file must hold a JSON array of records, got {_describe(loaded)}")
    return _numbered(loaded[:limit])


def _read_csv(path: str, text: str, limit: Optional[int]) -> tuple[list[str], Records]:
    # Python's csv keeps every cell a string; pandas would turn an output column of numbers into ints.
    reader = csv.reader(io.StringIO(text, newline=""))
    records: Records = []
    try:
        header = next(reader, [])
        row_start = reader.line_num + 1
        for row in reader:
            if limit is not None and len(records) >= limit:
                break
            if row and len(row) != len(header):
                message = f"has {len(row)} cells but the header has {len(header)} columns"
                raise DataError(path, message, where=f"line {row_start}")
            if row:
                records.append((f"line {row_start}", dict(zip(header, row))))
            row_start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(path, f"not valid CSV: {exc}", where=f"line {reader.line_num}") from None
    return header, records


def _numbered(records: list) -> Records:
    return [(f"record {index}", record) for index, record in enumerate(records, 1)]


def _rows_of(dataset, limit: Optional[int]) -> Records:
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return _numbered(dataset.to_list())


def _load_saved_dataset(path: str, data: DataConfig):
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(path)
    except FileNotFoundError:
        raise DataError(path, "a directory, but not one written by datasets' save_to_disk") from None
    if isinstance(dataset, DatasetDict):
        split = data.split or "train"
        if split not in dataset:
            splits = ", ".join(dataset)
            raise DataError(path, f"has no split {split!r} (splits: {splits}); set data.split to one of them")
        dataset = dataset[split]
    return dataset


def _load_hub_dataset(path: str, data: DataConfig):
    # Hub ids are `name` or `owner/name`; anything else that does not exist is a missing local file.
    if Path(path).suffix.lower() in FILE_KINDS or path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise DataError(path, "no such file or directory")
    from datasets import load_dataset

    try:
        return load_dataset(path, split=data.split or "train")
    except Exception as exc:  # datasets raises many kinds: connection, not found, gated, bad split
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(path, f"not a file, directory or reachable hub dataset ({reason})") from None


def _read_records(path: str, data: DataConfig) -> tuple[str, Optional[list[str]], Records]:
    """Raw records in source order, at most data.limit of them: (source kind, CSV header or None, records)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return "save_to_disk", None, _rows_of(_load_saved_dataset(str(local), data), data.limit)
    if not local.is_file():
        return "hub", None, _rows_of(_load_hub_dataset(path, data), data.limit)
    kind = FILE_KINDS.get(local.suffix.lower())
    if kind is None:
        known = ", ".join(FILE_KINDS)
        raise DataError(path, f"unsupported file type {local.suffix!r} (use {known} or a save_to_disk directory)")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(local)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses
            raise DataError(path, f"not a readable Parquet file ({exc})") from None
        table = table if data.limit is None else table.slice(0, data.limit)
        return kind, None, _numbered(table.to_pylist())
    text = _decode_utf8(path, local.read_bytes())
    if kind == "csv":
        return (kind, *_read_csv(path, text, data.limit))
    return kind, None, (_read_jsonl if kind == "jsonl" else _read_json)(path, text, data.limit)


# ------------------------------------------------------------------------------- records -> messages


def _detect_format(path: str, data: DataConfig, where: str, record: Any) -> str:
    if data.format != "auto":
        return data.format
    if not isinstance(record, dict):
        raise DataError(path, f"expected an object with fields, got {_describe(record)}", where=where)
    for fmt, field in (("alpaca", data.instruction_field), ("messages", data.messages_field),
                       ("sharegpt", SHAREGPT_FIELD)):
        if field in record:
            return fmt
    raise DataError(
        path,
        f"cannot tell the record format from its fields ({_fields(record)}); expected alpaca "
        f"({data.instruction_field}/{data.output_field}), messages ({data.messages_field}) or sharegpt "
        f"({SHAREGPT_FIELD}); set data.format and the data.*_field names",
        where=where,
    )


def _string(path: str, where: str, record: dict, field: str, required: bool = True) -> str:
    """A text field. Optional ones read absent or null as "" (Arrow fills missing cells with null)."""
    value = record.get(field)
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    if field not in record:
        raise DataError(path, f"missing (the record has {_fields(record)})", where=where, field=field)
    raise DataError(path, f"expected a string, got {_describe(value)}", where=where, field=field)


def _alpaca_messages(path: str, where: str, record: dict, data: DataConfig) -> list[dict]:
    instruction = _string(path, where, record, data.instruction_field)
    output = _string(path, where, record, data.output_field)
    prompt_input = _string(path, where, record, data.input_field, required=False)
    system = _string(path, where, record, data.system_field, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = record.get(data.history_field)
    if history is not None and not isinstance(history, (list, tuple)):
        message = f"expected a list of [user, assistant] pairs, got {_describe(history)}"
        raise DataError(path, message, where=where, field=data.history_field)
    for index, pair in enumerate(history or [], 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            message = f"item {index}: expected a [user, assistant] pair of strings"
            raise DataError(path, message, where=where, field=data.history_field)
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    # Exactly the reference's "\n".join([instruction, input]); the template strips a trailing "\n".
    messages.append({"role": "user", "content": "\n".join([instruction, prompt_input])})
    messages.append({"role": "assistant", "content": output})
    return messages


def _chat_messages(path: str, where: str, record: dict, field: str, sharegpt: bool) -> list[dict]:
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else CHAT_ROLES
    if field not in record:
        raise DataError(path, f"missing (the record has {_fields(record)})", where=where, field=field)
    turns = record[field]
    if not isinstance(turns, (list, tuple)):
        raise DataError(path, f"expected a list of messages, got {_describe(turns)}", where=where, field=field)
    messages = []
    for index, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            problem = f": expected an object, got {_describe(turn)}"
        elif turn.get(role_key) not in roles:
            known = ", ".join(list(roles)[:-1]) + f" or {list(roles)[-1]}"
            problem = f" has unknown {role_key!r} {turn.get(role_key)!r} (expected {known})"
        elif not isinstance(turn.get(content_key), str):
            problem = f" {content_key!r}: expected a string, got {_describe(turn.get(content_key))}"
        else:
            messages.append({"role": roles[turn[role_key]], "content": turn[content_key]})
            continue
        raise DataError(path, f"message {index}{problem}", where=where, field=field)
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(path, "no assistant message, so nothing to train on", where=where, field=field)
    return messages


def load_conversations(path: str, data: DataConfig) -> list[Conversation]:
    """Read and validate a data source into conversations, in source order (the first data.limit records).

    Raises:
        DataError: naming the file, the line or record, and the field of the first bad record.
    """
    return _read_conversations(str(path), data)[0]


def _read_conversations(path: str, data: DataConfig) -> tuple[list[Conversation], str, str]:
    """Conversations plus the source kind and the record format used."""
    kind, header, records = _read_records(path, data)
    if not records:
        raise DataError(path, "holds no records")
    fmt = _detect_format(path, data, *records[0])
    needed = {"alpaca": [data.instruction_field, data.output_field], "messages": [data.messages_field],
              "sharegpt": [SHAREGPT_FIELD]}[fmt]
    for column in needed if header is not None else []:  # CSV: name a missing column once, not on every row
        if column not in header:
            message = f"no such column in the CSV header (columns: {', '.join(header)})"
            raise DataError(path, message, where="line 1", field=column)
    conversations = []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(path, f"expected an object with fields, got {_describe(record)}", where=where)
        if fmt == "alpaca":
            messages = _alpaca_messages(path, where, record, data)
        else:
            field = data.messages_field if fmt == "messages" else SHAREGPT_FIELD
            messages = _chat_messages(path, where, record, field, sharegpt=fmt == "sharegpt")
        if data.system_prompt and not any(message["role"] == "system" for message in messages):
            messages.insert(0, {"role": "system", "content": data.system_prompt})
        conversations.append({"messages": messages, "source": f"{path}, {where}"})
    return conversations, kind, fmt


def _load_with_report(path: str, data: DataConfig) -> tuple[list[Conversation], dict]:
    """Conversations and the record-level report (what `loraft data check` shows without a tokenizer)."""
    conversations, kind, fmt = _read_conversations(path, data)
    turns = [message for conversation in conversations for message in conversation["messages"]]
    answers = [sum(m["role"] == "assistant" for m in conversation["messages"]) for conversation in conversations]
    return conversations, {
        "path": path, "source_kind": kind, "format": fmt, "records_read": len(conversations),
        "roles": {role: sum(m["role"] == role for m in turns) for role in CHAT_ROLES},
        "empty_outputs": sum(m["role"] == "assistant" and m["content"] == "" for m in turns),
        "multi_turn_records": sum(count > 1 for count in answers),
    }


# ------------------------------------------------------------------------------------- tokenizing


class _BatchEncoder:
    """Tokenizes a list of texts exactly as `tokenizer(text, add_special_tokens=...)` does, one call per list.

    tokenizers' Rust `encode_batch_fast` skips transformers' per-call Python work (measured 9 s vs 17.5 s
    for 51k records). The first list of each kind is checked against `tokenizer(...)`, and any difference
    falls back to the transformers call, so the ids always equal templates.encode_segments'.
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


def _encode(conversations: Sequence[Conversation], encoder: _BatchEncoder, template: Template, eos_token: str,
            max_length: int) -> list[tuple[list[int], list[int], int]]:
    """Tokenize conversations into (input_ids, labels, untruncated length), cut to max_length."""
    rendered = [template.render(conversation["messages"], eos_token) for conversation in conversations]
    first_ids = iter(encoder([segments[0].text for segments in rendered], add_special_tokens=True))
    rest_ids = iter(encoder([s.text for segments in rendered for s in segments[1:]], add_special_tokens=False))
    rows = []
    for segments in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        for index, segment in enumerate(segments):
            ids = next(first_ids) if index == 0 else next(rest_ids)
            input_ids += ids
            labels += ids if segment.supervised else [-100] * len(ids)
        rows.append((input_ids[:max_length], labels[:max_length], len(input_ids)))
    return rows


def _encode_columns(batch: dict, tokenizer, template_name: str, max_length: int) -> dict:
    """The datasets.map worker used when num_proc > 1."""
    conversations = [{"messages": messages} for messages in batch["messages"]]
    rows = _encode(conversations, _BatchEncoder(tokenizer), get_template(template_name), tokenizer.eos_token,
                   max_length)
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
            fn_kwargs={"tokenizer": tokenizer, "template_name": template.name, "max_length": max_length},
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
        digest.update(f"hub|{path}|{data.split}|{_load_hub_dataset(path, data)._fingerprint}".encode())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{specials}|{body}".encode()).hexdigest()


def _cache_key(path: str, data: DataConfig, tokenizer, template: Template) -> str:
    probe = [{"role": role, "content": role[0]} for role in CHAT_ROLES]
    fields = {"format", "max_length", "split", "instruction_field", "input_field", "output_field", "system_field",
              "history_field", "messages_field", "system_prompt", "limit"}
    parts = {
        "version": DATA_VERSION, "source": _source_fingerprint(path, data),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        # The rendered probe catches edits to a template's code, not just its name.
        "template": [template.name, [(s.text, s.supervised) for s in template.render(probe, "<eos>")]],
        "data": data.model_dump(include=fields),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _store(entry: Path, dataset, report: dict) -> None:
    """Write atomically: a finished entry appears at once, and a racing writer's copy is discarded."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        dataset.save_to_disk(str(staging))
        (staging / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(staging, entry)
    except OSError:
        if not (entry / "report.json").exists():  # else another process (torchrun rank) finished it first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tokenized_source(path: str, data: DataConfig, tokenizer) -> tuple[Any, dict]:
    """Tokenized data and the full report for one source, from the cache when the same inputs were seen."""
    from datasets import load_from_disk

    path = str(path)
    _check_tokenizer(tokenizer)
    template = get_template(data.template)
    entry = _cache_root(data) / _cache_key(path, data, tokenizer, template)
    if (entry / "report.json").exists():
        report = json.loads((entry / "report.json").read_text(encoding="utf-8"))
        hit = {"path": path, "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "cache_hit": True}
        return load_from_disk(str(entry)), {**report, **hit}
    conversations, report = _load_with_report(path, data)
    dataset, tokens_report = tokenize_conversations(conversations, tokenizer, template, data.max_length, data.num_proc)
    report.update(tokens_report)
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
        return _load_with_report(str(path), data)[1]
    return _tokenized_source(str(path), data, tokenizer)[1]


def preview_samples(path: str, data: DataConfig, tokenizer, limit: int) -> list[dict]:
    """The first `limit` kept samples, in source order, exactly as training sees them.

    Returns:
        dicts with source, text, input_ids, attention_mask, labels. `text` decodes input_ids run by run
        and wraps prompt (label -100) runs in ⟦…⟧; text outside the brackets is supervised.
    """
    _check_tokenizer(tokenizer)
    conversations = load_conversations(str(path), data)
    template = get_template(data.template)
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
