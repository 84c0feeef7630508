"""The real-model demo (`loraft demo --real` / `--model PATH.gguf`, loraft.demo.real) end to end on SmolLM2's GGUF at
2 steps, 8 held-out records and 4 general prompts: both runs train (guard on and off), the table and samples print, the results name the file,
the guarded run's LoRA answers on the original file in llama.cpp, and a second demo does not overwrite the first.
The numbers the README states come from the full demo (docs/benchmarks.md, "Retention"); here only its shape and the
invariants that hold at any size are checked. The task generator's split is checked without a model."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from conftest import TEST_CACHE as CACHE, locked_test_cache
from loraft.cli import main
from loraft.demo.format_task import format_task_records
from loraft.errors import RunError


def test_the_format_task_is_deterministic_checkable_and_its_heldout_inputs_never_train():
    train, heldout = format_task_records(seed=0, train=200, heldout=40)
    assert (train, heldout) == format_task_records(seed=0, train=200, heldout=40)
    assert train != format_task_records(seed=1, train=200, heldout=40)[0]
    assert {r["task"] for r in train} == {r["task"] for r in heldout} == {"date", "bracket"}

    def source(record):
        return re.search(r"\d{4}-\d\d-\d\d|\b[a-z]+$|(?<=Put )[a-z]+|(?<=word )[a-z]+(?= as)",
                         record["instruction"]).group(0)

    for record in train + heldout:
        text = source(record)
        if record["task"] == "date":
            year, month, day = text.split("-")
            assert record["output"] == f"{day}/{month}/{year}"
        else:
            assert record["output"] == f"[{text.upper()}]"
    assert not {source(r) for r in heldout} & {source(r) for r in train}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from loraft.export import llamacpp
    from loraft.smollm2 import smollm2_gguf

    try:
        with locked_test_cache():
            cached = smollm2_gguf(CACHE / "models", log=lambda line: None)
            converter = CACHE / "llama.cpp" / f"{llamacpp.PINNED_PACKAGE}-{llamacpp.PINNED_VERSION}"
            if not (converter / llamacpp.STAMP).is_file():
                llamacpp.fetch_pinned(converter, log=lambda line: None)
    except RunError as exc:  # offline with no copy: the one sentence says so
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("smollm2-demo")
    shutil.copy(cached, folder / cached.name)
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get(llamacpp.ENV_DIR):
            patch.setenv(llamacpp.ENV_DIR, str(converter))
        yield folder / cached.name


def test_the_real_model_demo_runs_both_runs_and_puts_the_adapter_on_the_original_file(smollm2, tmp_path, capsys):
    from loraft.demo.real import run_real_demo

    lines: list[str] = []
    results = run_real_demo(model=str(smollm2), workdir=tmp_path, steps=2, retention_prompts=4, heldout_records=8,
                            log=lines.append)
    text = "\n".join(lines)
    for row in ("base", "fine-tuned, guard on (default)", "fine-tuned, train.retention=off"):
        assert row in text
    assert "sample answers (greedy):" in text and "general:" in text
    saved = json.loads((tmp_path / "real" / "demo_results.json").read_text())
    assert saved["model"] == str(smollm2) and saved["steps"] == 2
    assert saved["retention"]["guarded"]["prompts"] == 4
    # the base's general answers are the same whichever run is measured (the adapter switched off, cached)
    assert saved["retention"]["guarded"]["base_accuracy"] == saved["retention"]["unguarded"]["base_accuracy"]
    guarded = json.loads((tmp_path / "real" / "run" / "loraft_run.json").read_text())
    unguarded = json.loads((tmp_path / "real" / "run-unguarded" / "loraft_run.json").read_text())
    assert guarded["plan"]["retention"].startswith("KL to the base") and unguarded["plan"]["retention"] == "off"
    metrics = [json.loads(line) for line in (tmp_path / "real" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("retention_kl" in m for m in metrics)
    llama = results["llama_cpp"]
    assert llama is not None and llama["verify"]["passed"], text
    report = json.loads((tmp_path / "real" / "gguf" / "export_report.json").read_text())
    assert report["mode"] == "adapter" and report["base"]["path"] == str(smollm2)
    with pytest.raises(RunError, match="--overwrite"):
        run_real_demo(model=str(smollm2), workdir=tmp_path, steps=2, retention_prompts=4, heldout_records=8,
                            log=lines.append)


def test_a_missing_model_file_is_one_sentence(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope.gguf"), "--workdir", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert "nope.gguf: no such file" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_real_with_another_stage_is_one_sentence(tmp_path, capsys):
    assert main(["demo", "--real", "--stage", "preference", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--real/--model is a stage of its own" in err and len(err.splitlines()) == 1
