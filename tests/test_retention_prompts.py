"""The shipped retention prompt set (its size, languages, kinds, checkable share) and the checker's matching rules."""

from __future__ import annotations

import json

import pytest

from loraft.retention_check import KINDS, LANGS, is_correct, load_prompts, normalise


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return load_prompts()


def test_the_shipped_set_loads_with_its_size_and_shares(prompts):
    assert len(prompts) >= 320
    assert sum(prompt["lang"] == "zh" for prompt in prompts) / len(prompts) >= 0.40
    assert sum(prompt["answers"] is not None for prompt in prompts) / len(prompts) >= 0.65


def test_every_kind_is_in_both_languages_and_chat_is_never_checked(prompts):
    present = {(prompt["lang"], prompt["kind"]) for prompt in prompts}
    assert present == {(lang, kind) for lang in LANGS for kind in KINDS}
    assert all(prompt["answers"] is None for prompt in prompts if prompt["kind"] == "chat")
    # the other kinds are there to be scored: each language has checkable prompts of each
    checkable = {(prompt["lang"], prompt["kind"]) for prompt in prompts if prompt["answers"]}
    assert checkable == {(lang, kind) for lang in LANGS for kind in KINDS if kind != "chat"}


def test_a_prefix_holds_the_whole_mix(prompts):
    """A quick retention run takes the first N prompts: the file is interleaved so that they are the set in small."""
    first = prompts[:40]
    assert {(prompt["lang"], prompt["kind"]) for prompt in first} == {(lang, kind) for lang in LANGS for kind in KINDS}
    assert 0.35 <= sum(prompt["lang"] == "zh" for prompt in first) / len(first) <= 0.6


def test_ids_and_prompts_are_unique(prompts):
    assert len({prompt["id"] for prompt in prompts}) == len(prompts)
    assert len({normalise(prompt["prompt"]) for prompt in prompts}) == len(prompts)
    assert all(prompt["id"].startswith(f"{prompt['lang']}-{prompt['kind']}-") for prompt in prompts)


def test_no_prompt_is_answered_by_repeating_it(prompts):
    """A model that echoes the question must not score: no accepted answer is found in its own prompt."""
    echoed = [(prompt["id"], answer) for prompt in prompts for answer in prompt["answers"] or []
              if is_correct(prompt["prompt"], [answer])]
    assert echoed == []


def test_every_answer_is_found_in_a_reply_that_states_it(prompts):
    for prompt in prompts:
        for answer in prompt["answers"] or []:
            assert is_correct(f"The answer is {answer}.", [answer]), (prompt["id"], answer)
            assert is_correct(f"答案是{answer}。", [answer]), (prompt["id"], answer)


def test_a_number_matches_only_a_whole_number_of_the_same_value():
    assert is_correct("A spider has 8 legs.", ["8", "eight"])
    assert not is_correct("A spider has 18 legs.", ["8"])
    assert not is_correct("It is 80.", ["8"])
    assert not is_correct("About 8.5 of them", ["8"])
    assert not is_correct("It is -8 today", ["8"])
    assert is_correct("It is -8 today", ["-8"])
    assert is_correct("10 - 8 = 2", ["2"])  # a minus between numbers is no sign
    assert is_correct("7 + 5 = 12.0", ["12"])
    assert is_correct("It costs 1,000 yuan", ["1000"])
    assert is_correct("蜘蛛有8条腿", ["8"])
    assert is_correct("What is 12 + 30? It is 42.", ["42"])
    assert not is_correct("What is 12 + 30? It is 43.", ["42"])


def test_full_width_text_is_half_width():
    assert is_correct("答案是８。", ["8"])
    assert is_correct("ＣＡＴ", ["cat"])
    assert is_correct("１２＋３０＝４２", ["42"])


def test_a_word_matches_only_at_word_boundaries_and_in_any_case():
    assert is_correct("It is a cat.", ["cat"])
    assert is_correct("CAT!", ["cat"])
    assert is_correct("The capital is PARIS.", ["Paris"])
    assert not is_correct("That is a category.", ["cat"])
    assert not is_correct("a bobcat", ["cat"])
    assert is_correct("猫是cat。", ["cat"])  # Chinese characters around an English word are no part of it
    assert is_correct("I don’t like tea.", ["don't like"])  # apostrophes of any kind are the same space
    assert is_correct("Good   morning!", ["good morning"])
    assert is_correct("Water is H₂O.", ["H2O"])


def test_a_chinese_answer_is_a_substring():
    assert is_correct("中国的首都是北京。", ["北京"])
    assert is_correct("北京是首都", ["北京"])
    assert is_correct("它们最喜欢吃竹子", ["竹"])
    assert not is_correct("中国的首都是上海。", ["北京"])


def test_a_wrong_reply_is_not_correct():
    assert not is_correct("The capital of France is Lyon.", ["Paris"])
    assert not is_correct("", ["Paris"])
    assert not is_correct("I don't know.", ["42", "forty-two"])


def test_answers_are_needed():
    with pytest.raises(ValueError, match="at least one answer"):
        is_correct("hello", [])


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "line 2: not valid JSON"),
    ('["a list"]', "line 2: must be a JSON object (got list)"),
    ('{"id": "x", "lang": "en", "kind": "fact", "prompt": "Hi?"}', "line 2: field 'answers' is missing"),
    ('{"id": "x", "lang": "en", "kind": "fact", "prompt": "Hi?", "answers": null, "note": 1}',
     "line 2: field 'note' is unknown"),
    ('{"id": "x", "lang": "fr", "kind": "fact", "prompt": "Hi?", "answers": null}',
     "line 2: field 'lang' must be one of en, zh (got 'fr')"),
    ('{"id": "x", "lang": "en", "kind": "facts", "prompt": "Hi?", "answers": null}',
     "line 2: field 'kind' must be one of fact, arithmetic, instruction, rewrite, chat (got 'facts')"),
    ('{"id": "x", "lang": "en", "kind": "fact", "prompt": "", "answers": null}',
     "line 2: field 'prompt' must be a non-empty string"),
    ('{"id": "x", "lang": "en", "kind": "fact", "prompt": "Hi?", "answers": "Paris"}',
     "line 2: field 'answers' must be null or a non-empty list of strings"),
    ('{"id": "x", "lang": "en", "kind": "fact", "prompt": "Hi?", "answers": ["?!"]}',
     "line 2: field 'answers' holds '?!', which is no answer after normalisation"),
    ('{"id": "a", "lang": "en", "kind": "fact", "prompt": "Hi?", "answers": null}', "line 2: id 'a' repeats line 1"),
])
def test_a_bad_line_is_an_error_naming_the_line(tmp_path, line, message):
    first = {"id": "a", "lang": "en", "kind": "chat", "prompt": "Hello!", "answers": None}
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(first) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_prompts(path)
    assert str(error.value).startswith(f"{path} {message}")


def test_a_file_given_by_path_loads_and_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    record = {"id": "zh-fact-001", "lang": "zh", "kind": "fact", "prompt": "中国的首都是哪里？", "answers": ["北京"]}
    path.write_text("\n" + json.dumps(record, ensure_ascii=False) + "\n\n", encoding="utf-8")
    assert load_prompts(path) == [record]
