"""The real-model demo's parts that need no model (`loraft demo --real` / `--model PATH.gguf`, loraft.demo.real): the
task generator's split, and the refusals. The demo itself runs on SmolLM2's GGUF in tests/test_real_model.py, beside the
other tests of the real file (they share its dequantized weights)."""

from __future__ import annotations

import re


from loraft.cli import main
from loraft.demo.format_task import format_task_records


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


def test_a_missing_model_file_is_one_sentence(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope.gguf"), "--workdir", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert "nope.gguf: no such file" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_real_with_another_stage_is_one_sentence(tmp_path, capsys):
    assert main(["demo", "--real", "--stage", "preference", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--real/--model is a stage of its own" in err and len(err.splitlines()) == 1
