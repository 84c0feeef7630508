"""The shipped retention guard text: its size and mix, and that it shares no content with the evaluation prompts."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

import loraft
from loraft.retention_check import GUARD_FILE, GUARD_KINDS, LANGS, load_guard_texts, load_prompts

_CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def guard() -> list[dict]:
    return load_guard_texts()


@pytest.fixture(scope="module")
def evaluation() -> list[dict]:
    return load_prompts()


def _plain(text: str) -> str:
    """Lowercase, NFKC, with every punctuation mark, symbol and whitespace removed."""
    return "".join(char for char in unicodedata.normalize("NFKC", text).lower() if char.isalnum())


def _word_grams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"[0-9a-z\u00c0-\u024f]+", unicodedata.normalize("NFKC", text).lower())
    return {tuple(words[index:index + n]) for index in range(len(words) - n + 1)}


def _char_grams(text: str, n: int = 8) -> set[str]:
    """n characters in a row of the text's runs without Latin letters (Latin words are `_word_grams`' part)."""
    runs = re.split(r"[a-z\u00c0-\u024f]+", _plain(text))
    return {run[index:index + n] for run in runs for index in range(len(run) - n + 1)}


def test_the_file_holds_240_rows_half_in_each_language_with_every_kind(guard):
    assert len(guard) == 240
    assert all(set(row) == {"id", "lang", "kind", "prompt", "response"} for row in guard)
    assert len({row["id"] for row in guard}) == len(guard)
    assert Counter(row["lang"] for row in guard) == {"en": 120, "zh": 120}
    assert {row["kind"] for row in guard} <= set(GUARD_KINDS)
    assert Counter((row["lang"], row["kind"]) for row in guard) == {(lang, kind): 15 for lang in LANGS
                                                                   for kind in GUARD_KINDS}


def test_every_prompt_and_response_is_a_short_non_empty_string_in_its_language(guard):
    for row in guard:
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), row["id"]
        assert isinstance(row["response"], str) and row["response"].strip(), row["id"]
        if row["lang"] == "zh":
            assert _CJK.search(row["prompt"]) and _CJK.search(row["response"]), row["id"]
            assert len("".join(row["response"].split())) <= 80, row["id"]
        else:
            assert re.match(r"[A-Z]", row["prompt"]), row["id"]
            assert len(row["response"].split()) <= 60, row["id"]
    assert len({_plain(row["prompt"]) for row in guard}) == len(guard)


def test_no_guard_prompt_is_an_evaluation_prompt(guard, evaluation):
    measured = {_plain(prompt["prompt"]) for prompt in evaluation}
    assert [row["id"] for row in guard if _plain(row["prompt"]) in measured] == []


def test_no_guard_prompt_shares_a_long_stretch_with_an_evaluation_prompt(guard, evaluation):
    """No 5 (Latin-script) words in a row in common, nor 8 Chinese characters in a row (punctuation and spaces
    dropped), whatever the prompt's language: an English prompt may quote Chinese and a Chinese one English."""
    words = set().union(*(_word_grams(prompt["prompt"]) for prompt in evaluation))
    chars = set().union(*(_char_grams(prompt["prompt"]) for prompt in evaluation))
    shared = [(row["id"], sorted(_word_grams(row["prompt"]) & words) + sorted(_char_grams(row["prompt"]) & chars))
              for row in guard]
    assert [(row_id, grams) for row_id, grams in shared if grams] == []


def test_no_guard_sum_reuses_the_numbers_of_an_evaluation_sum(guard, evaluation):
    """An arithmetic prompt of the guard holds no evaluation sum's operands (all of them, in any order)."""
    def numbers(text: str) -> set[str]:
        return set(re.findall(r"\d+(?:\.\d+)?", unicodedata.normalize("NFKC", text)))

    measured = [numbers(prompt["prompt"]) for prompt in evaluation if prompt["kind"] == "arithmetic"]
    measured = [operands for operands in measured if len(operands) >= 2]
    assert measured, "the evaluation set has sums written in digits"
    reused = [row["id"] for row in guard if row["kind"] == "arithmetic"
              and any(operands <= numbers(row["prompt"]) for operands in measured)]
    assert reused == []


def test_load_guard_texts_returns_what_the_file_holds(guard):
    text = (Path(loraft.__file__).parent / GUARD_FILE).read_text(encoding="utf-8")
    assert guard == [json.loads(line) for line in text.splitlines() if line.strip()]
    assert _CJK.search(text)  # real Chinese characters, not \\u escapes
    assert guard[0]["id"] == "en-guard-001" and guard[-1]["id"] == "zh-guard-120"
