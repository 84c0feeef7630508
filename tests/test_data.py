"""The data stage: every source format, validation messages, reference parity, masking, truncation, cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import ALPACA_RECORDS
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from loraft.config import DataConfig, RunConfig
from loraft.data import (
    PROMPT_CLOSE,
    PROMPT_OPEN,
    check_data,
    format_report,
    load_conversations,
    prepare_datasets,
    preview_samples,
    tokenize_conversations,
)
from loraft.errors import DataError
from loraft.encode import encode_segments
from loraft.templates import TEMPLATES, get_template

# Verbatim from the reference recipe (seeds/000, step 3); exec'd with the fixture tokenizer as `tokenizer`.
REFERENCE_PREPROCESS = '''
def preprocess_function(examples):
    max_length = 256
    inputs_ids, attention_mask, labels = [], [], []
    instruction = tokenizer("\\n".join(["Human: " + examples["instruction"], examples["input"]]).strip() + "\\n\\nAssistant: ")
    response = tokenizer(examples["output"] + tokenizer.eos_token)
    inputs_ids = instruction["input_ids"] + response["input_ids"]
    attention_mask = instruction["attention_mask"] + response["attention_mask"]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] # 模型只需要学习response
    if len(inputs_ids) > max_length:
        inputs_ids = inputs_ids[:max_length]
        attention_mask = attention_mask[:max_length]
        labels = labels[:max_length]
    return {"input_ids": inputs_ids, "attention_mask": attention_mask, "labels": labels}
'''

LONG_RECORD = {"instruction": "写一首关于春天的诗", "input": "", "output": "春眠不觉晓，处处闻啼鸟。" * 40}
PARITY_RECORDS = ALPACA_RECORDS + [LONG_RECORD]

CHAT = [
    {"role": "system", "content": "你是一个有帮助的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "人工智能是什么"},
    {"role": "assistant", "content": "人工智能是计算机科学的一个分支。"},
]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty loraft home of this test's own (the session's is shared): its tokenized-data cache folder."""
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "tokenized"


@pytest.fixture(scope="module")
def bloom_tokenizer(tiny_bloom_dir):
    return AutoTokenizer.from_pretrained(tiny_bloom_dir)


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def reference_preprocess(tokenizer, max_length: int):
    namespace = {"tokenizer": tokenizer}
    exec(REFERENCE_PREPROCESS.replace("max_length = 256", f"max_length = {max_length}"), namespace)
    return namespace["preprocess_function"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def config_for(path: Path, **data) -> RunConfig:
    return RunConfig.model_validate({"data": {"path": str(path), **data}})


def split_by_label(tokenizer, input_ids, labels) -> tuple[str, str]:
    prompt = [t for t, label in zip(input_ids, labels) if label == -100]
    supervised = [t for t, label in zip(input_ids, labels) if label != -100]
    return tokenizer.decode(prompt), tokenizer.decode(supervised)


# ------------------------------------------------------------------------------------- parity


def test_matches_reference_preprocess_function(tmp_path, bloom_tokenizer):
    source = tmp_path / "alpaca_data_zh"
    Dataset.from_list(PARITY_RECORDS).save_to_disk(str(source))
    dataset = Dataset.load_from_disk(str(source))
    expected = dataset.map(reference_preprocess(bloom_tokenizer, 256), remove_columns=dataset.column_names)
    assert len(expected[len(PARITY_RECORDS) - 1]["input_ids"]) == 256  # the long record really is cut

    prepared = prepare_datasets(config_for(source), bloom_tokenizer)

    assert len(prepared.train) == len(PARITY_RECORDS)
    for ours, reference in zip(prepared.train, expected):
        assert ours["input_ids"] == reference["input_ids"]
        assert ours["attention_mask"] == reference["attention_mask"]
        assert ours["labels"] == reference["labels"]
        assert ours["length"] == len(reference["input_ids"])
    assert prepared.report["truncated_samples"] == 1
    assert prepared.report["dropped"] == {}


def test_matches_reference_when_truncating_hard(tmp_path, bloom_tokenizer):
    source = write_jsonl(tmp_path / "alpaca.jsonl", PARITY_RECORDS)
    records = Dataset.from_list(PARITY_RECORDS)
    expected = records.map(reference_preprocess(bloom_tokenizer, 16), remove_columns=records.column_names)
    full = records.map(reference_preprocess(bloom_tokenizer, 10_000), remove_columns=records.column_names)
    trainable = [row for row in expected if any(label != -100 for label in row["labels"])]
    assert 0 < len(trainable) < len(expected)  # the check below must cover both kept and dropped samples

    prepared = prepare_datasets(config_for(source, max_length=16), bloom_tokenizer)

    assert [row["input_ids"] for row in prepared.train] == [row["input_ids"] for row in trainable]
    assert [row["labels"] for row in prepared.train] == [row["labels"] for row in trainable]
    assert [row["attention_mask"] for row in prepared.train] == [row["attention_mask"] for row in trainable]
    report = prepared.report
    assert report["dropped"] == {"no_response_token_after_truncation": len(expected) - len(trainable)}
    assert report["truncated_samples"] == sum(len(row["input_ids"]) > 16 for row in full)
    assert report["samples_kept"] == len(trainable)
    assert report["tokens"]["supervised"] == sum(sum(l != -100 for l in row["labels"]) for row in trainable)


@pytest.mark.parametrize("tokenizer_name", ["bloom_tokenizer", "llama_tokenizer"])
@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_batched_encoding_equals_encode_segments(request, tokenizer_name, template_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    template = get_template(template_name)
    conversations = [{"messages": CHAT, "source": "chat"}] + [
        {"messages": [{"role": "user", "content": "\n".join([r["instruction"], r["input"]])},
                      {"role": "assistant", "content": r["output"]}], "source": "alpaca"}
        for r in PARITY_RECORDS
    ]
    dataset, _ = tokenize_conversations(conversations, tokenizer, template, max_length=100_000)
    for row, conversation in zip(dataset, conversations):
        input_ids, labels = encode_segments(tokenizer, template.render(conversation["messages"], tokenizer.eos_token))
        assert row["input_ids"] == input_ids
        assert row["labels"] == labels


class UpperCasingTokenizer:
    """A fast tokenizer whose Python __call__ no longer matches its Rust backend (as a custom subclass might)."""

    is_fast = True

    def __init__(self, inner):
        self.inner = inner
        self.backend_tokenizer = inner.backend_tokenizer
        self.eos_token = inner.eos_token

    def __call__(self, text, add_special_tokens=True):
        text = text.upper() if isinstance(text, str) else [t.upper() for t in text]
        return self.inner(text, add_special_tokens=add_special_tokens)


def test_batched_encoding_falls_back_when_the_backend_disagrees(llama_tokenizer):
    tokenizer = UpperCasingTokenizer(llama_tokenizer)
    template = get_template("alpaca")
    conversations = [{"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "the fox"}]}]
    dataset, _ = tokenize_conversations(conversations, tokenizer, template, max_length=1000)
    expected_ids, expected_labels = encode_segments(tokenizer, template.render(conversations[0]["messages"], "</s>"))
    assert dataset[0]["input_ids"] == expected_ids
    assert dataset[0]["labels"] == expected_labels
    assert expected_ids != encode_segments(llama_tokenizer, template.render(conversations[0]["messages"], "</s>"))[0]


def test_worker_processes_give_the_same_dataset(bloom_tokenizer):
    template = get_template("human_assistant")
    conversations = [{"messages": CHAT[1:3] if i % 2 else CHAT, "source": f"r{i}"} for i in range(1100)]
    short_prompt = encode_segments(bloom_tokenizer, template.render(CHAT[1:3], bloom_tokenizer.eos_token)[:1])[0]
    max_length = len(short_prompt) + 2  # the short chats keep 2 answer tokens; the system prompt pushes CHAT out
    in_process, report = tokenize_conversations(conversations, bloom_tokenizer, template, max_length)
    workers, workers_report = tokenize_conversations(conversations, bloom_tokenizer, template, max_length, num_proc=2)
    assert in_process.to_dict() == workers.to_dict()
    assert report == workers_report
    assert report["samples_kept"] == 550
    assert report["dropped"] == {"no_response_token_after_truncation": 550}


# ------------------------------------------------------------------------------------- formats


def write_all_formats(tmp_path: Path) -> dict[str, Path]:
    paths = {"jsonl": write_jsonl(tmp_path / "a.jsonl", ALPACA_RECORDS)}
    paths["json"] = tmp_path / "a.json"
    paths["json"].write_text(json.dumps(ALPACA_RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["csv"] = tmp_path / "a.csv"
    with open(paths["csv"], "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA_RECORDS)
    paths["parquet"] = tmp_path / "a.parquet"
    Dataset.from_list(ALPACA_RECORDS).to_parquet(str(paths["parquet"]))
    paths["save_to_disk"] = tmp_path / "disk"
    Dataset.from_list(ALPACA_RECORDS).save_to_disk(str(paths["save_to_disk"]))
    paths["dataset_dict"] = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list(ALPACA_RECORDS), "test": Dataset.from_list(ALPACA_RECORDS[:1])}).save_to_disk(
        str(paths["dataset_dict"])
    )
    return paths


def test_every_source_format_reads_the_same_conversations(tmp_path):
    paths = write_all_formats(tmp_path)
    expected = [
        [{"role": "user", "content": "\n".join([r["instruction"], r["input"]]) if r["input"] else r["instruction"]},
         {"role": "assistant", "content": r["output"]}]
        for r in ALPACA_RECORDS
    ]
    for kind, path in paths.items():
        conversations = load_conversations(str(path), DataConfig())
        assert [c["messages"] for c in conversations] == expected, kind

    def sources(kind: str) -> list[str]:
        return [c["source"] for c in load_conversations(str(paths[kind]), DataConfig())]

    assert sources("jsonl")[:2] == [f"{paths['jsonl']}, line 1", f"{paths['jsonl']}, line 2"]
    assert sources("json")[-1] == f"{paths['json']}, record 8"
    # The 7th record's input ends in a newline, so its quoted cell spans lines 8-9 and the 8th starts at 10.
    assert sources("csv")[-2:] == [f"{paths['csv']}, line 8", f"{paths['csv']}, line 10"]
    assert sources("save_to_disk")[0] == f"{paths['save_to_disk']}, record 1"


def test_limit_split_system_prompt_and_history(tmp_path):
    paths = write_all_formats(tmp_path)
    test_split = load_conversations(str(paths["dataset_dict"]), DataConfig(split="test"))
    assert len(test_split) == 1
    assert len(load_conversations(str(paths["jsonl"]), DataConfig(limit=3))) == 3

    record = {"instruction": "再说一次", "output": "好的", "history": [["你好", "你好！"]], "sys": "简短回答"}
    source = write_jsonl(tmp_path / "h.jsonl", [record, {"instruction": "问", "output": "答"}])
    conversations = load_conversations(str(source), DataConfig(system_field="sys", system_prompt="默认"))
    assert conversations[0]["messages"] == [
        {"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再说一次"},
        {"role": "assistant", "content": "好的"},
    ]
    assert conversations[1]["messages"][0] == {"role": "system", "content": "默认"}


def test_messages_format_supervises_every_assistant_turn(tmp_path, bloom_tokenizer):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    prepared = prepare_datasets(config_for(source), bloom_tokenizer)
    row = prepared.train[0]
    prompt, supervised = split_by_label(bloom_tokenizer, row["input_ids"], row["labels"])
    assert supervised == "你好！有什么可以帮你？</s>人工智能是计算机科学的一个分支。</s>"
    assert prompt == "你是一个有帮助的助手。\n\nHuman: 你好\n\nAssistant: Human: 人工智能是什么\n\nAssistant: "
    assert prepared.report["format"] == "messages"
    assert prepared.report["roles"] == {"system": 1, "user": 3, "assistant": 3}
    assert prepared.report["multi_turn_records"] == 1


def test_sharegpt_format_maps_roles(tmp_path, llama_tokenizer):
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    record = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT]}
    source = write_jsonl(tmp_path / "sharegpt.jsonl", [record])
    assert load_conversations(str(source), DataConfig())[0]["messages"] == CHAT

    prepared = prepare_datasets(config_for(source, template="chatml"), llama_tokenizer)
    row = prepared.train[0]
    prompt, supervised = split_by_label(llama_tokenizer, row["input_ids"], row["labels"])
    assert supervised == "你好！有什么可以帮你？<|im_end|>人工智能是计算机科学的一个分支。<|im_end|>"
    assert prompt.startswith("<s><|im_start|>system\n你是一个有帮助的助手。<|im_end|>\n<|im_start|>user\n你好")
    assert "人工智能是什么" in prompt


def test_llama_tokenizer_gets_exactly_one_bos(tmp_path, llama_tokenizer):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    row = prepare_datasets(config_for(source), llama_tokenizer).train[0]
    bos = llama_tokenizer.bos_token_id
    assert row["input_ids"][0] == bos
    assert row["input_ids"].count(bos) == 1
    assert row["labels"][0] == -100


# ---------------------------------------------------------------------------- truncation, report


def test_all_samples_dropped_says_why(tmp_path, bloom_tokenizer):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_RECORDS[:5])
    with pytest.raises(DataError) as error:
        prepare_datasets(config_for(source, max_length=4), bloom_tokenizer)
    assert str(error.value) == (
        f"{source}: all 5 samples were dropped: no response token left after truncation to max_length 4"
    )
    with pytest.raises(DataError) as error:
        preview_samples(str(source), DataConfig(max_length=4), bloom_tokenizer, limit=3)
    assert str(error.value) == (
        f"{source}: all 5 samples were dropped: no response token left after truncation to max_length 4"
    )


def test_report_is_json_and_readable(tmp_path, bloom_tokenizer, alpaca_jsonl):
    records_only = check_data(str(alpaca_jsonl), DataConfig())
    assert records_only == {
        "path": str(alpaca_jsonl), "source_kind": "jsonl", "format": "alpaca", "records_read": 8,
        "roles": {"system": 0, "user": 8, "assistant": 8}, "empty_outputs": 0, "multi_turn_records": 0,
    }
    full = check_data(str(alpaca_jsonl), DataConfig(max_length=16), bloom_tokenizer)
    assert json.loads(json.dumps(full)) == full
    assert full["samples_kept"] + sum(full["dropped"].values()) == full["records_read"] == 8
    percentiles = full["length_percentiles"]
    assert percentiles["p50"] <= percentiles["p90"] <= percentiles["p99"] <= percentiles["max"] == 16
    assert full["tokens"]["total"] == full["tokens"]["supervised"] + full["tokens"]["prompt"]
    text = format_report(full)
    assert f"data:    {alpaca_jsonl} (jsonl, alpaca format)" in text
    assert f"samples: {full['samples_kept']} kept" in text
    assert format_report(records_only).count("\n") == 1


def test_preview_marks_the_prompt_and_matches_training(tmp_path, bloom_tokenizer, alpaca_jsonl):
    samples = preview_samples(str(alpaca_jsonl), DataConfig(), bloom_tokenizer, limit=3)
    assert len(samples) == 3
    assert samples[0]["text"] == f"{PROMPT_OPEN}Human: 人工智能是什么\n\nAssistant: {PROMPT_CLOSE}人工智能是计算机科学的一个分支。</s>"
    assert samples[1]["text"].startswith(f"{PROMPT_OPEN}Human: 请把下面的句子翻译成英文\n今天天气很好\n\nAssistant: {PROMPT_CLOSE}")
    assert samples[0]["source"] == f"{alpaca_jsonl}, line 1"
    assert json.loads(json.dumps(samples)) == samples

    # With hard truncation some samples are dropped; the preview shows exactly the ones training keeps.
    truncated = preview_samples(str(alpaca_jsonl), DataConfig(max_length=20), bloom_tokenizer, limit=100)
    train = prepare_datasets(config_for(alpaca_jsonl, max_length=20), bloom_tokenizer).train
    assert 0 < len(truncated) == len(train) < len(ALPACA_RECORDS)
    for sample, row in zip(truncated, train):
        assert {k: sample[k] for k in ("input_ids", "attention_mask", "labels")} == {
            k: row[k] for k in ("input_ids", "attention_mask", "labels")
        }


def test_preview_tokens_join_to_the_text_and_mark_the_cut(bloom_tokenizer, alpaca_jsonl, tiny_llama_dir):
    from loraft.model import load_tokenizer

    for tokenizer in (bloom_tokenizer, load_tokenizer(str(tiny_llama_dir))):
        whole = preview_samples(str(alpaca_jsonl), DataConfig(), tokenizer, limit=4)
        for sample in whole:
            assert len(sample["tokens"]) == len(sample["input_ids"])
            decoded = tokenizer.decode(sample["input_ids"], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
            assert "".join(piece["text"] for piece in sample["tokens"]) == decoded
            assert [piece["special"] for piece in sample["tokens"]] == [
                token in tokenizer.all_special_ids for token in sample["input_ids"]]
            assert sample["tokens"][-1] == {"text": tokenizer.eos_token, "special": True}
            assert (sample["full_length"], sample["truncated"]) == (len(sample["input_ids"]), False)
        cut = preview_samples(str(alpaca_jsonl), DataConfig(max_length=20), tokenizer, limit=100)
        assert any(sample["truncated"] for sample in cut)
        for sample in cut:
            assert len(sample["input_ids"]) <= 20
            assert sample["truncated"] == (sample["full_length"] > 20)


def test_eval_fraction_and_eval_path(tmp_path, bloom_tokenizer, alpaca_disk_dir, alpaca_jsonl):
    config = config_for(alpaca_disk_dir, eval_fraction=0.25)
    first = prepare_datasets(config, bloom_tokenizer)
    again = prepare_datasets(config, bloom_tokenizer)
    assert (len(first.train), len(first.eval)) == (24, 8)
    assert first.eval.to_dict() == again.eval.to_dict()
    assert first.report["eval"] == {"source": "eval_fraction", "eval_fraction": 0.25, "seed": 42, "samples_kept": 8}
    reseeded = prepare_datasets(RunConfig.model_validate({**config.model_dump(), "train": {"seed": 7}}), bloom_tokenizer)
    assert reseeded.eval.to_dict() != first.eval.to_dict()

    with_path = prepare_datasets(config_for(alpaca_disk_dir, eval_path=str(alpaca_jsonl)), bloom_tokenizer)
    assert (len(with_path.train), len(with_path.eval)) == (32, 8)
    assert with_path.report["eval"]["path"] == str(alpaca_jsonl)
    assert with_path.report["eval_samples"] == 8


# ------------------------------------------------------------------------------------------ cache


def test_cache_hit_is_identical_and_max_length_misses(tmp_path, bloom_tokenizer, alpaca_jsonl, cache_dir):
    first = prepare_datasets(config_for(alpaca_jsonl), bloom_tokenizer)
    assert first.report["cache_hit"] is False
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 1
    second = prepare_datasets(config_for(alpaca_jsonl), bloom_tokenizer)
    assert second.report["cache_hit"] is True
    assert second.train.to_dict() == first.train.to_dict()
    assert {**second.report, "cache_hit": False} == first.report

    shorter = prepare_datasets(config_for(alpaca_jsonl, max_length=16), bloom_tokenizer)
    assert shorter.report["cache_hit"] is False
    assert max(shorter.train["length"]) == 16

    alpaca_jsonl.write_text(alpaca_jsonl.read_text(encoding="utf-8") + json.dumps(ALPACA_RECORDS[0]) + "\n", "utf-8")
    edited = prepare_datasets(config_for(alpaca_jsonl), bloom_tokenizer)
    assert edited.report["cache_hit"] is False
    assert len(edited.train) == 9


def test_cache_write_race_keeps_the_finished_entry(tmp_path):
    from loraft.tokencache import _store

    entry = tmp_path / "race" / "key"
    _store(entry, Dataset.from_dict({"a": [1]}), {"writer": 1})
    _store(entry, Dataset.from_dict({"a": [2]}), {"writer": 2})  # a second rank finishing later
    assert json.loads((entry / "report.json").read_text(encoding="utf-8")) == {"writer": 1}
    assert Dataset.load_from_disk(str(entry))["a"] == [1]
    assert [p.name for p in entry.parent.iterdir()] == ["key"]  # no staging directory left behind


# ------------------------------------------------------------------------------------- bad input


def load_error(path, **data) -> str:
    with pytest.raises(DataError) as error:
        load_conversations(str(path), DataConfig(**data))
    return str(error.value)


def test_malformed_json_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n', encoding="utf-8")
    assert load_error(path) == f"{path}, line 3: not valid JSON: Expecting value (column 32)"


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]', "utf-8")
    assert load_error(path) == f"{path}, line 3: not valid JSON: Expecting ',' delimiter (column 23)"
    path.write_text('{"data": [{"instruction": "a", "output": "b"}]}', encoding="utf-8")
    assert load_error(path) == f"{path}: a .json file must hold a JSON array of records, got an object"


def test_json_lines_saved_as_json_are_read(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ALPACA_RECORDS[:2])
    assert [c["source"] for c in load_conversations(str(path), DataConfig())] == [f"{path}, line 1", f"{path}, line 2"]


def test_csv_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,input,answer\n你好,,你好！\n", encoding="utf-8")
    assert load_error(path) == (
        f"{path}, line 1, field 'output': no such column in the CSV header (columns: instruction, input, answer)"
    )


def test_missing_null_and_non_string_fields(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": ""}])
    assert load_error(path) == f"{path}, line 2, field 'output': missing (the record has instruction, input)"
    path = write_jsonl(tmp_path / "b.jsonl", [{"instruction": None, "output": "b"}])
    assert load_error(path) == f"{path}, line 1, field 'instruction': expected a string, got null"
    path = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "12 + 30", "output": 42}])
    assert load_error(path) == f"{path}, line 1, field 'output': expected a string, got a number (42)"
    path = tmp_path / "d.parquet"
    Dataset.from_list([{"instruction": "a", "output": None}]).to_parquet(str(path))
    assert load_error(path) == f"{path}, record 1, field 'output': expected a string, got null"


def test_empty_output_is_kept_with_eos_supervised(tmp_path, bloom_tokenizer):
    # (a file in which every output is empty is refused: tests/test_rundir.py)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "说点什么", "output": ""}, {"instruction": "你好", "output": "你好"}])
    prepared = prepare_datasets(config_for(path), bloom_tokenizer)
    row = prepared.train[0]
    assert [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100] == [bloom_tokenizer.eos_token_id]
    assert prepared.report["empty_outputs"] == 1


def test_data_check_refuses_all_empty_responses_with_trains_sentence(tmp_path, bloom_tokenizer, tiny_bloom_dir, capsys):
    from loraft.cli import main

    path = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": r["instruction"], "output": ""} for r in ALPACA_RECORDS])
    with pytest.raises(DataError) as error:  # what `loraft train` runs on its data
        prepare_datasets(config_for(path), bloom_tokenizer)
    n = len(ALPACA_RECORDS)
    assert str(error.value) == (f"{path}: every response is empty ({n} of {n}), so training would only teach the "
                                "model to stop; set data.allow_empty_responses=true if that is intended")
    for model in ([], ["--model", str(tiny_bloom_dir)]):
        assert main(["data", "check", str(path), *model]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {error.value}"
        assert main(["data", "check", str(path), *model, "--allow-empty-responses", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["empty_outputs"] == n


def test_empty_file(tmp_path):
    for name in ("empty.jsonl", "empty.json", "empty.csv"):
        path = tmp_path / name
        path.write_text("\n" if name.endswith("l") else "", encoding="utf-8")
        assert load_error(path) == f"{path}: holds no records"


def test_not_utf8(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n" + '{"instruction": "你好"}'.encode("gbk"))
    assert load_error(path) == f"{path}, line 2: not UTF-8 text (byte 0xc4); save the file as UTF-8"


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi", encoding="utf-8")
    assert load_error(tmp_path / "notes") == f"{tmp_path / 'notes'}: a directory, but not one written by datasets' save_to_disk"


def test_missing_split(tmp_path):
    paths = write_all_formats(tmp_path)
    assert load_error(paths["dataset_dict"], split="validation") == (
        f"{paths['dataset_dict']}: has no split 'validation' (splits: train, test); set data.split to one of them"
    )


def test_unknown_roles_and_no_assistant(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}, {"messages": [{"role": "bot", "content": "hi"}]}])
    assert load_error(path) == (
        f"{path}, line 2, field 'messages': message 1 has unknown 'role' 'bot' (expected system, user or assistant)"
    )
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "assistant", "value": "b"}]}])
    assert load_error(path) == (
        f"{path}, line 1, field 'conversations': message 2 has unknown 'from' 'assistant' (expected human, gpt or system)"
    )
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert load_error(path) == f"{path}, line 1, field 'messages': no assistant message, so nothing to train on"
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": None}]}])
    assert load_error(path) == f"{path}, line 1, field 'messages': message 1 'content': expected a string, got null"


def test_undetectable_format(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    assert load_error(path) == (
        f"{path}, line 1: cannot tell the record format from its fields (question, answer); expected alpaca "
        "(instruction/output), messages (messages) or sharegpt (conversations); set data.format and the "
        "data.*_field names"
    )
    assert len(load_conversations(str(path), DataConfig(instruction_field="question", output_field="answer"))) == 1


def test_missing_path_and_unreachable_hub_id(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert load_error(missing) == f"{missing}: no such file or directory"
    assert load_error("no_such_dataset_xyz") == (
        "no_such_dataset_xyz: not a file, directory or reachable hub dataset "
        "(Couldn't reach 'no_such_dataset_xyz' on the Hub (OfflineModeIsEnabled))"
    )
    (tmp_path / "a.txt").write_text("hi", encoding="utf-8")
    assert load_error(tmp_path / "a.txt") == (
        f"{tmp_path / 'a.txt'}: unsupported file type '.txt' (use .json, .jsonl, .csv, .parquet or a save_to_disk "
        "directory)"
    )
