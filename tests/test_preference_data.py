"""Preference data (DPO pairs, KTO unpaired): every format reads to the same records, each completion is masked
exactly as SFT masks that answer, truncation is TRL's, bad records stop with one sentence, and the columns are the
ones TRL's trainers take."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from loraft.cli import main
from loraft.config import DataConfig, PreferenceConfig, RunConfig, load_config
from loraft.data import PROMPT_CLOSE, PROMPT_OPEN, preview_samples
from loraft.errors import ConfigError, DataError
from loraft.preference import check, format_report, prepare_preferences, preview
from loraft.records import PREFERENCE_FORMATS, load_conversations, load_preferences, source_format
from loraft.templates import get_template

# trl/trainer/dpo_trainer.py (TRL 1.16): what DPOTrainer._prepare_dataset's tokenize_fn returns and
# DataCollatorForPreference reads.
TRL_DPO_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
# trl/trainer/kto_trainer.py (TRL 1.16): KTOTrainer._prepare_dataset's tokenize_fn (prompt_ids, completion_ids) and the
# dataset's label, which DataCollatorForUnpairedPreference reads.
TRL_KTO_COLUMNS = ["prompt_ids", "completion_ids", "label"]

# LLaMA-Factory's alpaca ranking format; the third has a system prompt and an earlier turn.
PAIRS = [
    {"instruction": "人工智能是什么", "input": "", "chosen": "人工智能是计算机科学的一个分支。", "rejected": "不知道。"},
    {"instruction": "请把下面的句子翻译成英文", "input": "今天天气很好", "chosen": "The weather is nice today.",
     "rejected": "今天天气很好"},
    {"instruction": "再说一次", "input": "", "system": "简短回答", "history": [["你好", "你好！"]], "chosen": "好的",
     "rejected": "不"},
]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def prompt_of(record: dict) -> list[dict]:
    """The prompt messages an alpaca record stands for (loraft's alpaca reading, written out)."""
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for user, assistant in record.get("history", []):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    text = "\n".join([record["instruction"], record["input"]]) if record["input"] else record["instruction"]
    return messages + [{"role": "user", "content": text}]


def as_conversational(record: dict, plain: bool = False) -> dict:
    """TRL's conversational preference format (chosen/rejected as lists holding the assistant message)."""
    def side(text):
        return text if plain else [{"role": "assistant", "content": text}]

    return {"prompt": prompt_of(record), "chosen": side(record["chosen"]), "rejected": side(record["rejected"])}


def as_sharegpt(record: dict) -> dict:
    """LLaMA-Factory's sharegpt ranking format."""
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in prompt_of(record)]
    return {"conversations": turns, "chosen": {"from": "gpt", "value": record["chosen"]},
            "rejected": {"from": "gpt", "value": record["rejected"]}}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bloom_tokenizer(tiny_bloom_dir):
    return AutoTokenizer.from_pretrained(tiny_bloom_dir)


@pytest.fixture()
def pairs_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


# ------------------------------------------------------------------------------------- formats


def test_every_format_reads_to_the_same_pairs(tmp_path):
    expected = [(prompt_of(r), r["chosen"], r["rejected"]) for r in PAIRS]
    sources = {
        "preference_alpaca": write_jsonl(tmp_path / "alpaca.jsonl", PAIRS),
        "preference_messages": write_jsonl(tmp_path / "conversational.jsonl", [as_conversational(r) for r in PAIRS]),
        "preference_sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", [as_sharegpt(r) for r in PAIRS]),
    }
    plain = write_jsonl(tmp_path / "plain.jsonl", [as_conversational(r, plain=True) for r in PAIRS])
    for fmt, path in [*sources.items(), ("preference_messages", plain)]:
        assert source_format(str(path), DataConfig()) == fmt
        for data in (DataConfig(), DataConfig(format=fmt)):
            pairs = load_preferences(str(path), data)
            assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == expected, path.name
    json_array = tmp_path / "pairs.json"
    json_array.write_text(json.dumps(PAIRS, ensure_ascii=False), encoding="utf-8")
    assert [p["source"] for p in load_preferences(str(json_array), DataConfig())][-1] == f"{json_array}, record 3"
    # TRL's standard format: a prompt string is the user's turn; data.system_prompt applies as in SFT
    standard = write_jsonl(tmp_path / "standard.jsonl", [{"prompt": "问", "chosen": "答", "rejected": "不答"}])
    assert load_preferences(str(standard), DataConfig(system_prompt="简短回答"))[0]["prompt"] == [
        {"role": "system", "content": "简短回答"}, {"role": "user", "content": "问"}]


def test_unpaired_formats_read_kto_records(tmp_path):
    records = [dict(PAIRS[0], completion=PAIRS[0]["chosen"], label=True),
               dict(PAIRS[2], completion=PAIRS[2]["rejected"], label=False)]
    for record in records:
        del record["chosen"], record["rejected"]
    expected = [(prompt_of(r), r["completion"], r["label"]) for r in records]
    sources = {
        "unpaired_alpaca": write_jsonl(tmp_path / "alpaca.jsonl", records),
        "unpaired_messages": write_jsonl(tmp_path / "messages.jsonl", [
            {"prompt": prompt_of(r), "completion": [{"role": "assistant", "content": r["completion"]}],
             "label": r["label"]} for r in records]),
        "unpaired_sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", [
            {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in prompt_of(r)],
             "completion": r["completion"], "label": r["label"]} for r in records]),
    }
    with open(tmp_path / "kto.csv", "w", encoding="utf-8", newline="") as handle:  # a CSV cell's label is text
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "completion", "label"])
        writer.writeheader()
        writer.writerows({"instruction": r["instruction"], "input": r["input"], "completion": r["completion"],
                          "label": str(r["label"]).lower()} for r in records)
    for fmt, path in sources.items():
        assert source_format(str(path), DataConfig()) == fmt
        assert [(p["prompt"], p["completion"], p["label"]) for p in load_preferences(str(path), DataConfig())] == \
            expected
    from_csv = load_preferences(str(tmp_path / "kto.csv"), DataConfig())
    assert [(p["completion"], p["label"]) for p in from_csv] == [(r["completion"], r["label"]) for r in records]
    assert check(str(sources["unpaired_alpaca"]), RunConfig())["labels"] == {
        "desirable": 1, "undesirable": 1}


def test_sft_on_preference_data_names_the_objectives(pairs_jsonl):
    with pytest.raises(DataError) as error:
        load_conversations(str(pairs_jsonl), DataConfig())
    assert str(error.value) == (f"{pairs_jsonl}: holds preference records (preference_alpaca), not instruction "
                                "data: train on them with train.objective=dpo, kto or orpo")
    assert set(PREFERENCE_FORMATS) == {f"{kind}_{style}" for kind in ("preference", "unpaired")
                                       for style in ("alpaca", "messages", "sharegpt")}


# ------------------------------------------------------------------------------- masks = SFT's


def last_answer_only(labels: list[int], prompt_length: int) -> list[int]:
    """SFT's labels with earlier answers masked: in a preference pair they are part of the prompt."""
    return [-100] * prompt_length + labels[prompt_length:]


@pytest.mark.parametrize("model, template", [("tiny_bloom_dir", "auto"), ("tiny_llama_dir", "chatml"),
                                             ("tiny_qwen2_dir", "model"), ("tiny_llama3_dir", "model")])
def test_each_side_is_masked_as_sft_masks_that_answer(request, tmp_path, model, template):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    path = write_jsonl(tmp_path / "pairs.jsonl", [as_conversational(r) for r in PAIRS])
    data = DataConfig(template=template, max_length=1000)
    samples = preview(str(path), RunConfig(data=data), tokenizer, limit=10)
    dataset = prepare_preferences(str(path), data, tokenizer)[0]
    assert len(samples) == len(dataset) == len(PAIRS)
    end_of_turn = get_template(template, tokenizer).stop_text(tokenizer.eos_token)  # </s>, <|im_end|>, <|eot_id|>
    for side in ("chosen", "rejected"):
        sft_source = write_jsonl(tmp_path / f"sft-{side}.jsonl", [
            {key: value for key, value in dict(r, output=r[side]).items() if key not in ("chosen", "rejected")}
            for r in PAIRS])
        sft = preview_samples(str(sft_source), data, tokenizer, limit=10)
        for sample, row, reference in zip(samples, dataset, sft):
            ours, prompt_length = sample[side], len(row["prompt_ids"])
            length = len(ours["input_ids"])
            assert ours["input_ids"] == row["prompt_ids"] + row[f"{side}_ids"] == reference["input_ids"][:length]
            assert ours["labels"] == last_answer_only(reference["labels"], prompt_length)[:length]
            # all SFT supervises after the completion is nothing: the text after the end-of-turn is prompt
            assert set(reference["labels"][length:]) <= {-100}
            assert tokenizer.decode(row[f"{side}_ids"]).endswith(end_of_turn)
            # TRL's collator marks the completion with completion_mask = [0] * prompt + [1] * completion
            assert [int(label != -100) for label in ours["labels"]] == [0] * prompt_length + [1] * (
                length - prompt_length)
    # the earlier answer of the third record is context: SFT supervises it, the pair does not
    assert "你好！" in samples[2]["prompt"] and samples[2]["chosen"]["completion"].startswith("好的")


def test_preview_marks_the_prompt_and_shows_both_sides(pairs_jsonl, tiny_bloom_dir, bloom_tokenizer, capsys):
    samples = preview(str(pairs_jsonl), RunConfig(), bloom_tokenizer, limit=2)
    assert len(samples) == 2
    prompt = "Human: 人工智能是什么\n\nAssistant: "
    assert samples[0]["prompt"] == prompt
    assert samples[0]["chosen"]["text"] == f"{PROMPT_OPEN}{prompt}{PROMPT_CLOSE}人工智能是计算机科学的一个分支。</s>"
    assert samples[0]["rejected"]["text"] == f"{PROMPT_OPEN}{prompt}{PROMPT_CLOSE}不知道。</s>"
    for side in ("chosen", "rejected"):
        shown = samples[0][side]
        assert "".join(piece["text"] for piece in shown["tokens"]) == bloom_tokenizer.decode(shown["input_ids"])
        assert (shown["full_length"], shown["truncated"]) == (len(shown["input_ids"]), False)

    assert main(["data", "preview", str(pairs_jsonl), "--model", str(tiny_bloom_dir), "--limit", "1"]) == 0
    prompt_tokens = samples[0]["chosen"]["labels"].count(-100)
    supervised = {side: len(samples[0][side]["labels"]) - prompt_tokens for side in ("chosen", "rejected")}
    assert capsys.readouterr().out.splitlines() == [
        f"--- {pairs_jsonl}, line 1 (prompt {prompt_tokens} tokens; supervised: chosen {supervised['chosen']}, "
        f"rejected {supervised['rejected']})",
        f"{PROMPT_OPEN}Human: 人工智能是什么", "", f"Assistant: {PROMPT_CLOSE}",
        "chosen:   人工智能是计算机科学的一个分支。</s>",
        "rejected: 不知道。</s>",
    ]
    assert main(["data", "preview", str(pairs_jsonl), "--model", str(tiny_bloom_dir), "--limit", "2", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == samples


# ------------------------------------------------------------------------------ truncation, report


def test_truncation_is_trls_and_counted(pairs_jsonl, bloom_tokenizer):
    whole, whole_report = prepare_preferences(str(pairs_jsonl), DataConfig(max_length=1000), bloom_tokenizer)
    assert whole_report["truncated_prompts"] == 0
    assert whole_report["truncated_completions"] == {"chosen": 0, "rejected": 0}
    longest_prompt = max(len(row["prompt_ids"]) for row in whole)
    max_length = longest_prompt + 1  # one token of room where the prompt is longest
    cut, report = prepare_preferences(str(pairs_jsonl), DataConfig(max_length=max_length), bloom_tokenizer)
    for side in ("chosen", "rejected"):
        for full, row in zip(whole, cut):  # DataCollatorForPreference: (prompt + completion)[:max_length]
            assert row["prompt_ids"] + row[f"{side}_ids"] == (full["prompt_ids"] + full[f"{side}_ids"])[:max_length]
        assert report["truncated_completions"][side] == sum(
            len(full["prompt_ids"] + full[f"{side}_ids"]) > max_length for full in whole) > 0
    assert report["truncated_prompts"] == 0 and report["length_percentiles"]["max"] == max_length

    limits = PreferenceConfig(max_prompt_length=5, max_completion_length=4)
    short, report = prepare_preferences(str(pairs_jsonl), DataConfig(max_length=64), bloom_tokenizer, limits)
    for full, row in zip(whole, short):  # the prompt keeps its end, each completion its start
        assert row["prompt_ids"] == full["prompt_ids"][-5:]
        assert row["chosen_ids"] == full["chosen_ids"][:4]
    assert report["truncated_prompts"] == sum(len(full["prompt_ids"]) > 5 for full in whole) == len(PAIRS)
    assert report["truncated_completions"] == {
        side: sum(len(full[f"{side}_ids"]) > 4 for full in whole) for side in ("chosen", "rejected")}
    assert (report["max_prompt_length"], report["max_completion_length"]) == (5, 4)
    text = format_report(report)
    assert f"cut:     {len(PAIRS)} prompts; completions: {report['truncated_completions']['chosen']} chosen, " \
           f"{report['truncated_completions']['rejected']} rejected" in text
    preview_sample = preview(str(pairs_jsonl), RunConfig(data=DataConfig(max_length=64), preference=limits), bloom_tokenizer, 1)[0]
    assert preview_sample["prompt_truncated"] and preview_sample["chosen"]["truncated"]
    assert preview_sample["chosen"]["full_length"] == len(whole[0]["prompt_ids"]) + len(whole[0]["chosen_ids"])


def test_check_report_without_and_with_a_tokenizer(pairs_jsonl, tiny_bloom_dir, capsys):
    assert main(["data", "check", str(pairs_jsonl)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"data:    {pairs_jsonl} (jsonl, preference_alpaca format)",
        "records: 3 read: 3 chosen/rejected pairs; 1 multi-turn prompts",
    ]
    assert main(["data", "check", str(pairs_jsonl), "--model", str(tiny_bloom_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "preference_alpaca" and report["samples"] == 3
    assert report["prompt_roles"] == {"system": 1, "user": 4, "assistant": 1}
    assert report["tokens"]["chosen"] > 0 and report["truncated_completions"] == {"chosen": 0, "rejected": 0}


# ------------------------------------------------------------------------------- TRL's columns


def test_columns_are_the_ones_trl_takes(pairs_jsonl, tmp_path, bloom_tokenizer):
    dataset, _ = prepare_preferences(str(pairs_jsonl), DataConfig(), bloom_tokenizer)
    assert dataset.column_names == TRL_DPO_COLUMNS
    assert all(len(dataset[column]) == len(PAIRS) for column in TRL_DPO_COLUMNS)
    assert all(isinstance(token, int) for row in dataset for column in TRL_DPO_COLUMNS for token in row[column])

    unpaired = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": as_conversational(r)["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in PAIRS for side in ("chosen", "rejected")])
    kto, report = prepare_preferences(str(unpaired), DataConfig(), bloom_tokenizer)
    assert kto.column_names == TRL_KTO_COLUMNS
    assert kto["label"] == [True, False] * len(PAIRS)
    assert kto["completion_ids"][0::2] == dataset["chosen_ids"]
    assert kto["completion_ids"][1::2] == dataset["rejected_ids"]
    assert kto["prompt_ids"][0::2] == dataset["prompt_ids"]
    assert set(report["truncated_completions"]) == {"completion"}


# ------------------------------------------------------------------------------------- bad input


def refused(path: Path, *flags: str, capsys) -> str:
    """The one error line of `loraft data check PATH FLAGS` (exit 2, no traceback)."""
    assert main(["data", "check", str(path), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0][len("error: "):]


@pytest.mark.parametrize("records, message", [
    ([PAIRS[0], {"instruction": "问", "chosen": "答"}],
     "line 2, field 'rejected': missing (the record has instruction, chosen)"),
    ([{"prompt": "问", "chosen": "答", "rejected": "答"}],
     "line 1, field 'rejected': the same text as 'chosen', so the pair prefers neither"),
    ([{"prompt": [{"role": "user", "content": "问"}], "chosen": [{"role": "assistant", "content": " "}],
       "rejected": "答"}],
     "line 1, field 'chosen': empty: there is no answer to prefer or reject"),
    ([{"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "gpt", "value": "答"},
       "rejected": {"from": "gpt", "value": ""}}],
     "line 1, field 'rejected': empty: there is no answer to prefer or reject"),
    ([{"prompt": "问", "completion": "", "label": True}],
     "line 1, field 'completion': empty: there is no answer to prefer or reject"),
    ([{"prompt": "问", "completion": "答", "label": "yes"}],
     "line 1, field 'label': expected a boolean (true: a desirable completion, false: an undesirable one), got a "
     "string"),
    ([{"prompt": "问", "completion": "答", "label": 1}],
     "line 1, field 'label': expected a boolean (true: a desirable completion, false: an undesirable one), got a "
     "number (1)"),
    ([{"prompt": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}], "chosen": "a",
       "rejected": "b"}],
     "line 1, field 'prompt': the prompt ends with a message from the assistant; it must end with the user message "
     "the completions answer"),
    ([{"prompt": 3, "chosen": "a", "rejected": "b"}],
     "line 1, field 'prompt': expected a string or a list of messages, got a number (3)"),
    ([{"prompt": "问", "chosen": [{"role": "user", "content": "答"}], "rejected": "b"}],
     "line 1, field 'chosen': expected the assistant's message (role 'assistant'), got role 'user'"),
    ([{"prompt": "问", "chosen": 42, "rejected": "b"}],
     "line 1, field 'chosen': expected a string or the assistant's message (or a list holding it), got a number (42)"),
    ([{"chosen": "a", "rejected": "b"}],
     "line 1: a preference record, but no prompt field (instruction, prompt, conversations) among its fields "
     "(chosen, rejected); set data.instruction_field or give the prompt"),
])
def test_bad_records_stop_with_one_sentence(tmp_path, capsys, records, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as error:
        load_preferences(str(path), DataConfig())
    assert str(error.value) == f"{path}, {message}"
    assert refused(path, capsys=capsys) == f"{path}, {message}"


def test_a_prompt_that_leaves_no_room_is_dropped_and_counted_as_sft_drops(pairs_jsonl, tiny_bloom_dir,
                                                                        bloom_tokenizer, capsys):
    """One rule for every objective (loraft.data): cut keeping the start; a record with no supervised token left is
    dropped and counted, and only data with none left stops, in one sentence."""
    whole, _ = prepare_preferences(str(pairs_jsonl), DataConfig(max_length=1000), bloom_tokenizer)
    lengths = [len(row["prompt_ids"]) for row in whole]
    max_length = sorted(lengths)[-1]  # the longest prompt (the third record's) fills it
    assert lengths.index(max_length) == 2 and lengths.count(max_length) == 1
    kept, report = prepare_preferences(str(pairs_jsonl), DataConfig(max_length=max_length), bloom_tokenizer)
    assert [row["prompt_ids"] for row in kept] == [row["prompt_ids"] for row in whole][:2]
    assert report["dropped"] == {"no_response_token_after_truncation": 1}
    assert (report["samples_tokenized"], report["samples_kept"], report["samples"]) == (3, 2, 2)
    flags = ["--model", str(tiny_bloom_dir), "--max-length", str(max_length)]
    assert main(["data", "check", str(pairs_jsonl), *flags, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == {"no_response_token_after_truncation": 1}
    assert main(["data", "preview", str(pairs_jsonl), *flags, "--limit", "3", "--json"]) == 0
    previewed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sample["source"] for sample in previewed] == [f"{pairs_jsonl}, line 1", f"{pairs_jsonl}, line 2"]
    # keeping the prompt's end leaves the room
    assert main(["data", "check", str(pairs_jsonl), *flags, "--max-prompt-length", str(max_length - 2)]) == 0
    assert "cut:     1 prompts" in capsys.readouterr().out
    # no record left: one sentence, as for SFT
    shortest = min(lengths)
    message = (f"{pairs_jsonl}: all 3 samples were dropped: no response token left after truncation to max_length "
               f"{shortest}")
    with pytest.raises(DataError) as error:
        prepare_preferences(str(pairs_jsonl), DataConfig(max_length=shortest), bloom_tokenizer)
    assert str(error.value) == message
    for command in ("check", "preview"):
        assert main(["data", command, str(pairs_jsonl), "--model", str(tiny_bloom_dir), "--max-length",
                     str(shortest)]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"error: {message}\n" and "Traceback" not in captured.err


def test_length_limits_are_checked_at_load_time(capsys, pairs_jsonl):
    assert load_config(None).preference == PreferenceConfig(max_prompt_length=None, max_completion_length=None)
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.max_length=128", "preference.max_prompt_length=128"])
    assert str(error.value) == ("defaults with overrides: preference.max_prompt_length must be < data.max_length, "
                                "to leave room for the completion (got 128 >= 128)")
    with pytest.raises(ConfigError) as error:
        load_config(None, ["preference.max_completion_length=0"])
    assert str(error.value) == "defaults with overrides: preference.max_completion_length must be > 0 or null (got 0)"
    assert refused(pairs_jsonl, "--max-prompt-length", "0", capsys=capsys) == (
        "command line: preference.max_prompt_length must be > 0 or null (got 0)")


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
values = st.none() | st.booleans() | st.integers() | st.text(max_size=6)
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                                    st.sampled_from(["user", "assistant", "system", "human", "gpt", ""]) | values,
                                    max_size=3), max_size=3)
near_preferences = st.dictionaries(
    st.sampled_from(["instruction", "input", "prompt", "conversations", "chosen", "rejected", "completion", "label",
                     "history", "system"]),
    values | messages | st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), values, max_size=2),
    max_size=6)


@SETTINGS
@given(records=st.lists(near_preferences, min_size=1, max_size=4))
def test_any_preference_like_record_is_read_or_refused_in_one_sentence(records):
    with tempfile.TemporaryDirectory() as directory:
        path = write_jsonl(Path(directory) / "p.jsonl", records)
        try:
            fmt = source_format(str(path), DataConfig())
            read = load_preferences(str(path), DataConfig()) if fmt in PREFERENCE_FORMATS else []
        except DataError as error:
            assert str(error).startswith(str(path)) and "\n" not in str(error)
            return
        for preference in read:
            assert preference["prompt"][-1]["role"] == "user"
            assert all(isinstance(preference[side], str) and preference[side].strip()
                       for side in ("chosen", "rejected", "completion") if side in preference)
