"""The command table: data check/preview through the CLI, exit codes, one-sentence errors."""

import json

import pytest

from loraft.cli import main


def test_data_check_json_is_one_object(alpaca_jsonl, tiny_bloom_dir, capsys):
    assert main(["data", "check", str(alpaca_jsonl), "--model", str(tiny_bloom_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records_read"] == 8 and report["samples_kept"] == 8
    assert report["tokens"]["supervised"] > 0 and report["dropped"] == {}


def test_data_check_text_without_a_model(alpaca_jsonl, capsys):
    """Without a tokenizer the report counts records and turns only: no token lines."""
    assert main(["data", "check", str(alpaca_jsonl)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"data:    {alpaca_jsonl} (jsonl, alpaca format)",
        "records: 8 read; turns: 0 system, 8 user, 8 assistant; 0 empty outputs; 0 multi-turn records",
    ]


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


@pytest.mark.parametrize("command", ["serve", "ui"])
@pytest.mark.parametrize("hidden, missing", [(["fastapi"], "fastapi"), (["fastapi", "uvicorn"], "fastapi, uvicorn")])
def test_serve_without_its_extra_exits_2_before_any_work(tmp_path, monkeypatch, capsys, hidden, missing, command):
    import sys

    for module in hidden:  # a None entry makes importlib.util.find_spec report the module as absent
        monkeypatch.setitem(sys.modules, module, None)
    # the run directory / workspace does not exist either: a check made after loading would report that instead
    argv = ["serve", str(tmp_path / "no-run")] if command == "serve" else ["ui", "--workspace", str(tmp_path / "no")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: loraft {command} needs the 'serve' extra ({missing} not installed): "
                            "run pip install 'loraft[serve]'\n")


def test_train_by_preset_name_or_a_list_of_presets(tmp_path, monkeypatch, capsys):
    from loraft.presets import preset_names, preset_path

    monkeypatch.chdir(tmp_path)
    assert main(["train", "bloom-1b4-zh"]) == 2
    assert capsys.readouterr().err == ("error: bloom-1b4-zh: no config file or preset by that name "
                                       f"(presets: {', '.join(preset_names())})\n")
    # a preset's values reach validation: an override error names the preset's file
    assert main(["train", "demo", "train.max_stepz=1"]) == 2
    assert capsys.readouterr().err == f"error: {preset_path('demo')} with overrides: unknown config key train.max_stepz\n"
    assert main(["config", "--presets"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == preset_names()
    assert main(["config", "--preset", "bloom-1b4-zh-lora"]) == 0
    assert capsys.readouterr().out == preset_path("bloom-1b4-zh-lora").read_text(encoding="utf-8")
    assert main(["config", "--preset", "nope"]) == 2
    assert capsys.readouterr().err == f"error: unknown preset 'nope' (presets: {', '.join(preset_names())})\n"


def test_serve_flags_reach_the_server(tmp_path, capsys):
    """--max-queue, --shutdown-timeout and --context-length are checked by serve() before anything loads."""
    from loraft.cli import main

    for flag, value, message in (("--max-queue", "0", "--max-queue must be > 0 (got 0)"),
                                 ("--shutdown-timeout", "-1", "--shutdown-timeout must be >= 0 (got -1.0)"),
                                 ("--context-length", "1", "--context-length must be > 1 (got 1)")):
        assert main(["serve", str(tmp_path), flag, value]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
