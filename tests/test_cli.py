"""The command table: data check/preview through the CLI, exit codes, one-sentence errors."""

import json

import pytest

from loraft.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFT_CACHE_DIR", str(tmp_path / "cache"))


def test_data_check_json_is_one_object(alpaca_jsonl, tiny_bloom_dir, capsys):
    assert main(["data", "check", str(alpaca_jsonl), "--model", str(tiny_bloom_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records_read"] == 8 and report["samples_kept"] == 8
    assert report["tokens"]["supervised"] > 0 and report["dropped"] == {}


def test_data_check_text_without_a_model(alpaca_jsonl, capsys):
    assert main(["data", "check", str(alpaca_jsonl)]) == 0
    assert "8" in capsys.readouterr().out


def test_data_preview_json_is_what_training_sees(alpaca_jsonl, tiny_bloom_dir, capsys):
    from transformers import AutoTokenizer

    assert main(["data", "preview", str(alpaca_jsonl), "--model", str(tiny_bloom_dir), "--limit", "3", "--json"]) == 0
    samples = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(samples) == 3
    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    prompt = tokenizer("Human: 人工智能是什么\n\nAssistant: ")["input_ids"]
    response = tokenizer("人工智能是计算机科学的一个分支。" + tokenizer.eos_token)["input_ids"]
    assert samples[0]["input_ids"] == prompt + response
    assert samples[0]["labels"] == [-100] * len(prompt) + response
    assert samples[0]["attention_mask"] == [1] * len(prompt + response)


def test_malformed_jsonl_exits_2_with_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    assert main(["data", "check", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}, line 2: ")
    assert "Traceback" not in captured.err


def test_unknown_config_key_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 3\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err == f"error: {config}: unknown config key train.epochs\n"
