"""The retention prompt set and its checker: does a fine-tuned model still answer general questions?

`retention_prompts.jsonl` (package data, written by the project) holds short general prompts in English and
Chinese, each with the strings a correct reply must contain (`answers`), or null where a reply cannot be checked
(chat). The base model and the fine-tuned model answer the same prompts; `is_correct` scores each reply.
`retention_guard.jsonl` (package data too) holds the retention guard's training text: general prompts with a
reply each, disjoint from the prompts above, so that what the guard trains on is never what is measured.
This module imports nothing of loraft.
"""

from __future__ import annotations

import json
import re
import unicodedata
from decimal import Decimal
from importlib import resources
from pathlib import Path

PROMPTS_FILE = "retention_prompts.jsonl"
GUARD_FILE = "retention_guard.jsonl"
LANGS = ("en", "zh")
KINDS = ("fact", "arithmetic", "instruction", "rewrite", "chat")
GUARD_KINDS = (*KINDS, "explain", "list", "translate")
FIELDS = ("id", "lang", "kind", "prompt", "answers")

# A number in normalised text: a sign only survives normalisation where it is one (see `normalise`)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# Letters and digits that continue a word: Latin only, so "cat" matches in "猫是cat" but not in "category"
_WORD_CHAR = "0-9a-z\u00c0-\u024f"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """The retention prompts, validated: the shipped set, or the JSONL file at `path`.

    Returns:
        One dict per non-blank line, with exactly the fields id, lang, kind, prompt and answers.

    Raises:
        ValueError: naming the file, line and field of the first bad line (bad JSON, a missing, unknown or
            mistyped field, an unknown lang or kind, an answer that normalises to nothing, a repeated id).
    """
    if path is None:
        name = f"loraft/{PROMPTS_FILE}"
        text = resources.files("loraft").joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    else:
        name = str(path)
        text = Path(path).read_text(encoding="utf-8")
    prompts: list[dict] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        _validate(record, where)
        if record["id"] in first_line_of:
            raise ValueError(f"{where}: id {record['id']!r} repeats line {first_line_of[record['id']]}")
        first_line_of[record["id"]] = number
        prompts.append(record)
    return prompts


def load_guard_texts() -> list[dict]:
    """The retention guard's training text: short general prompts in English and Chinese, each with a correct
    reply, disjoint from the evaluation prompts (`load_prompts`) so the guard never trains on what is measured.

    Returns:
        One dict per non-blank line of the shipped file, with the fields id, lang, kind (one of GUARD_KINDS),
        prompt and response.
    """
    text = resources.files("loraft").joinpath(GUARD_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _validate(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: must be a JSON object (got {type(record).__name__})")
    missing = [field for field in FIELDS if field not in record]
    if missing:
        raise ValueError(f"{where}: field {missing[0]!r} is missing")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: field {unknown[0]!r} is unknown (fields: {', '.join(FIELDS)})")
    for field in ("id", "prompt"):
        if not isinstance(record[field], str) or not record[field].strip():
            raise ValueError(f"{where}: field {field!r} must be a non-empty string (got {record[field]!r})")
    if record["lang"] not in LANGS:
        raise ValueError(f"{where}: field 'lang' must be one of {', '.join(LANGS)} (got {record['lang']!r})")
    if record["kind"] not in KINDS:
        raise ValueError(f"{where}: field 'kind' must be one of {', '.join(KINDS)} (got {record['kind']!r})")
    answers = record["answers"]
    if answers is None:
        return
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{where}: field 'answers' must be null or a non-empty list of strings (got {answers!r})")
    for answer in answers:
        if not isinstance(answer, str) or not normalise(answer):
            raise ValueError(f"{where}: field 'answers' holds {answer!r}, which is no answer after normalisation")


def normalise(text: str) -> str:
    """`text` as the checker compares it: NFKC (full-width to half-width), lowercase, every punctuation mark,
    symbol and whitespace run one space. A decimal point between digits and a minus sign opening a number
    ("-3", not the hyphen in "5-3") are kept, and thousands separators dropped, so numbers keep their value."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2212", "-")
    text = _THOUSANDS.sub("", text)
    kept = []
    for index, char in enumerate(text):
        if char.isalnum():
            kept.append(char)
            continue
        before = text[index - 1] if index else ""
        after = text[index + 1] if index + 1 < len(text) else ""
        decimal_point = char == "." and before.isdigit() and after.isdigit()
        sign = char == "-" and after.isdigit() and not before.isalnum()
        kept.append(char if decimal_point or sign else " ")
    return " ".join("".join(kept).split())


def is_correct(reply: str, answers: list[str]) -> bool:
    """Whether `reply` contains any of `answers`, both normalised (`normalise`).

    A number answer ("8", "-3", "2.5") matches a number of the same value in the reply, never part of one:
    "8" is not in "18", "-8" or "8.5", but is in "8.0". An answer ending in a Latin letter or digit matches only
    where no Latin letter or digit continues it ("cat" is not in "category"); a Chinese answer is a substring.

    Raises:
        ValueError: when `answers` is empty (a prompt with null answers cannot be checked).
    """
    if not answers:
        raise ValueError("is_correct needs at least one answer (a prompt with null answers is not checkable)")
    text = normalise(reply)
    numbers = [Decimal(found) for found in _NUMBER.findall(text)]
    for answer in answers:
        wanted = normalise(answer)
        if _NUMBER.fullmatch(wanted):
            if Decimal(wanted) in numbers:
                return True
            continue
        pattern = re.escape(wanted)
        if re.match(f"[{_WORD_CHAR}]", wanted):
            pattern = f"(?<![{_WORD_CHAR}])" + pattern
        if re.match(f"[{_WORD_CHAR}]", wanted[-1]):
            pattern += f"(?![{_WORD_CHAR}])"
        if re.search(pattern, text):
            return True
    return False
