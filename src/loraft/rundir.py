"""Opening a run directory for use: the one check every consumer (chat, generate, eval, merge, serve) goes through.

A run directory is usable as it is when its `loraft_run.json` says `finished` (or it has none: an adapter
directory made by hand) and it holds the adapter. Anything else is refused unless asked for: an unfinished or
failed run's newest complete checkpoint with `--allow-unfinished`, and modelling code from the base model's
folder (`trust_remote_code` in the run's config.yaml, which anyone who wrote the folder controls) only with
`--trust-remote-code` on the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from loraft.config import RunConfig, load_config
from loraft.errors import RunError

RUN_FILE = "loraft_run.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunAccess:
    """What a consumer of a run directory may do beyond the safe default (both off)."""

    allow_unfinished: bool = False  # use an unfinished or failed run's newest checkpoint
    trust_remote_code: bool = False  # run modelling code shipped with the base model


@dataclass(frozen=True)
class UsableRun:
    """A run directory checked for use: its config (with trust_remote_code as granted), its record, and the
    directory to load the adapter (and tokenizer) from: the run itself, or a checkpoint of an unfinished run."""

    run_dir: Path
    config: RunConfig
    record: dict
    adapter_dir: Path

    @property
    def status(self) -> Optional[str]:
        return self.record.get("status")


def write_text_atomically(path: Union[str, Path], text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it over `path`: a crash leaves the old file
    or the new one, never a cut-off one. Every small file loraft writes goes through here."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomically(path: Union[str, Path], payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def read_record(run_dir: Union[str, Path]) -> dict:
    """The run's `loraft_run.json` ({} when there is none; `status: unreadable` when it is cut off)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": "unreadable"}
    return record if isinstance(record, dict) else {"status": "unreadable"}


def read_run_status(run_dir: Union[str, Path]) -> Optional[str]:
    """The `status` recorded in a run directory, or None when it holds no loraft run."""
    return read_record(run_dir).get("status")


def last_complete_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The newest checkpoint-N that was fully written (staging dirs never carry that name)."""
    if not checkpoint_dir.is_dir():
        return None
    steps = []
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and child.name[11:].isdigit():
            if (child / "trainer_state.json").is_file():
                steps.append((int(child.name[11:]), child))
    return max(steps)[1] if steps else None


def open_run(run_dir: Union[str, Path], access: RunAccess = RunAccess()) -> UsableRun:
    """Check a run directory before any model is loaded; one sentence (RunError) when it cannot be used."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    record = read_record(run_dir)
    status = record.get("status")
    has_adapter = (run_dir / "adapter_config.json").is_file()
    if status in (None, "finished"):
        if not has_adapter:
            raise RunError(f"{run_dir}: not a finished loraft run (no adapter_config.json)")
        adapter_dir = run_dir
    elif not access.allow_unfinished:
        raise RunError(f"{run_dir}: the run is {status}, not finished; pass --allow-unfinished to use its newest "
                       "checkpoint anyway")
    else:
        adapter_dir = last_complete_checkpoint(run_dir / CHECKPOINTS)
        if adapter_dir is None or not (adapter_dir / "adapter_config.json").is_file():
            raise RunError(f"{run_dir}: the run is {status} and has no complete checkpoint to use")
    config = load_config(run_dir / "config.yaml")
    if config.model.trust_remote_code and not access.trust_remote_code:
        raise RunError(f"{run_dir}: its base model {config.model.name_or_path} runs its own modelling code "
                       "(trust_remote_code in config.yaml); pass --trust-remote-code if you trust it")
    config = config.model_copy(update={"model": config.model.model_copy(
        update={"trust_remote_code": access.trust_remote_code})})
    return UsableRun(run_dir=run_dir, config=config, record=record, adapter_dir=adapter_dir)
