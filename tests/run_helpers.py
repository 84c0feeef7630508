"""Finished tiny runs for the eval / merge / serve tests, trained once per test session and shared.

A run is trained with `loraft.train.train` (the real pipeline) into the session's base temp directory and
reused by every test module that asks for the same name.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ALPACA_RECORDS


def alpaca_file(directory: Path) -> Path:
    """The conftest alpaca records as a JSONL file under `directory`."""
    path = directory / "alpaca.jsonl"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA_RECORDS), encoding="utf-8")
    return path


def trained_run(tmp_path_factory, name: str, base_model_dir: Path, overrides: list[str] = ()) -> Path:
    """Train (or reuse) a few-step run of `base_model_dir` on the alpaca records; returns its directory.

    The learning rate is high on purpose: after 4 steps the LoRA B matrices and any modules_to_save copy
    differ clearly from their initial values, so merge / eval invariants compare real changes.
    """
    from loraft.config import load_config
    from loraft.train import read_run_status, train

    root = tmp_path_factory.getbasetemp() / "loraft-runs"
    run_dir = root / name
    if read_run_status(run_dir) == "finished":
        return run_dir
    data = alpaca_file(root)
    config = load_config(None, [
        f"model.name_or_path={base_model_dir}", f"data.path={data}", f"output_dir={run_dir}", "overwrite=true",
        "train.max_steps=4", "train.learning_rate=0.01", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.logging_steps=1", "train.save_steps=1000",
        "generation.max_new_tokens=8",
        # fp32 with the reference's order: the e2e chat test needs this run's greedy answer to be several pieces long
        "train.precision=fp32", "train.sampling=random", *overrides,
    ])
    return train(config)
