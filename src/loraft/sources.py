"""Reading a data source into raw records: a `datasets.save_to_disk` directory (what the reference recipe loads), a
.json (array; JSON Lines saved as .json too), .jsonl, .csv or .parquet file, or a hub dataset id.

Each record comes with where it is: `("line 3", record)`, or `("record 3", record)` where there are no lines. What the
records mean (their format, their conversations) is records.py's. Every error names the file and the line or record.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from loraft.config import DataConfig
from loraft.errors import DataError

FILE_KINDS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}

Records = list  # [(where, record)] with where "line N" or "record N", 1-based


def describe_value(value: Any) -> str:
    """What a value is, for an error message: `a number (3)`, `a string`, `null`, `an object`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"a number ({value})"
    names = {type(None): "null", bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def field_names(record: dict) -> str:
    """A record's field names for an error message, comma-separated (`none` for an empty record)."""
    # a field name with a line break or other control character is shown escaped: the message stays one line
    return ", ".join(name if isinstance(name, str) and name.isprintable() else repr(name) for name in record) or "none"


def _read_bytes(path: str, local: Path) -> bytes:
    """The file's bytes; a file that exists but cannot be opened (no permission, or kernel confinement: loraft ui's
    Landlock) is one sentence naming it."""
    try:
        return local.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot be read ({exc.strerror or exc})") from None


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
        raise DataError(path, f"a .json file must hold a JSON array of records, got {describe_value(loaded)}")
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


def load_hub_dataset(path: str, data: DataConfig):
    # Hub ids are `name` or `owner/name`; anything else that does not exist is a missing local file.
    if Path(path).suffix.lower() in FILE_KINDS or path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise DataError(path, "no such file or directory")
    from datasets import load_dataset

    try:
        return load_dataset(path, split=data.split or "train")
    except Exception as exc:  # datasets raises many kinds: connection, not found, gated, bad split
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(path, f"not a file, directory or reachable hub dataset ({reason})") from None


def read_records(path: str, data: DataConfig) -> tuple[str, Optional[list[str]], Records]:
    """Raw records in source order, at most data.limit of them: (source kind, CSV header or None, records)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return "save_to_disk", None, _rows_of(_load_saved_dataset(str(local), data), data.limit)
    if not local.is_file():
        return "hub", None, _rows_of(load_hub_dataset(path, data), data.limit)
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
    text = _decode_utf8(path, _read_bytes(path, local))
    if kind == "csv":
        return (kind, *_read_csv(path, text, data.limit))
    return kind, None, (_read_jsonl if kind == "jsonl" else _read_json)(path, text, data.limit)


def read_json_records(path: str) -> Records:
    """(where, record) pairs of a .json array or a .jsonl file (the same reader as training data)."""
    text = _decode_utf8(path, _read_bytes(path, Path(path)))
    return _read_json(path, text, None) if str(path).endswith(".json") else _read_jsonl(path, text, None)
