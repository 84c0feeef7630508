"""The check before a run directory is used (chat, generate, eval, merge, serve, the UI): `open_run` returns a
`UsableRun` or refuses in one sentence.

A run directory is usable as it is when its `loraft_run.json` says `finished` (or it has none: an adapter directory
made by hand) and it holds the adapter. Anything else is refused unless asked for: an unfinished or failed run's
newest complete checkpoint with `--allow-unfinished` (or a named one), and modelling code from the base model's folder
(`trust_remote_code` in the run's config.yaml, which anyone who wrote the folder controls) only with
`--trust-remote-code` on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from loraft import gguf_base
from loraft.config import RunConfig, load_config
from loraft.errors import ModelError, RunError
from loraft.rundir import (ADAPTER_CONFIG, CHECKPOINT_NAME, CHECKPOINT_PREFIX, CONFIG_FILE, TRAINER_STATE, RunDir,
                           checkpoint_step)


@dataclass(frozen=True)
class RunAccess:
    """What a consumer of a run directory may do beyond the safe default (both off)."""

    allow_unfinished: bool = False  # use an unfinished or failed run's newest checkpoint
    trust_remote_code: bool = False  # run modelling code shipped with the base model
    checkpoint: Optional[str] = None  # use this checkpoint (a name under checkpoints/, e.g. checkpoint-200) instead


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


def _named_checkpoint(run_dir: Path, name: str) -> Path:
    """A complete checkpoint of the run by its name (`checkpoint-N`); a checkpoint can be used whatever the status."""
    checkpoints = RunDir(run_dir).checkpoints
    if not CHECKPOINT_NAME.fullmatch(name):
        raise RunError(f"{run_dir}: {name!r} is not a checkpoint name ({CHECKPOINT_PREFIX}N)")
    path = checkpoints / name
    if not (path / TRAINER_STATE).is_file() or not (path / ADAPTER_CONFIG).is_file():
        found = sorted((c.name for c in checkpoints.iterdir() if c.name.startswith(CHECKPOINT_PREFIX)),
                       key=lambda n: checkpoint_step(n) if CHECKPOINT_NAME.fullmatch(n) else -1
                       ) if checkpoints.is_dir() else []
        raise RunError(f"{run_dir}: no complete checkpoint {name} (checkpoints: {', '.join(found) or 'none'})")
    return path


def open_run(run_dir: Union[str, Path], access: RunAccess = RunAccess()) -> UsableRun:
    """Check a run directory before any model is loaded; one sentence (RunError) when it cannot be used."""
    run = RunDir(run_dir)
    run_dir, record = run.path, run.record()
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    status = record.get("status")
    if access.checkpoint is not None:
        adapter_dir = _named_checkpoint(run_dir, access.checkpoint)
    elif status in (None, "finished"):
        if not (run_dir / ADAPTER_CONFIG).is_file():
            raise RunError(f"{run_dir}: not a finished loraft run (no {ADAPTER_CONFIG})")
        adapter_dir = run_dir
    elif not access.allow_unfinished:
        raise RunError(f"{run_dir}: the run is {status}, not finished; pass --allow-unfinished to use its newest "
                       "checkpoint anyway")
    else:
        adapter_dir = run.last_checkpoint()
        if adapter_dir is None or not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise RunError(f"{run_dir}: the run is {status} and has no complete checkpoint to use")
    config = load_config(run.config_file)
    try:  # a GGUF base must be the file the adapter was trained on
        gguf_base.check_unchanged((record.get("identity") or {}).get("model.gguf"), f"run {run_dir}")
    except ModelError as exc:
        raise RunError(str(exc)) from None
    if config.model.trust_remote_code and not access.trust_remote_code:
        raise RunError(f"{run_dir}: its base model {config.model.name_or_path} runs its own modelling code "
                       f"(trust_remote_code in {CONFIG_FILE}); pass --trust-remote-code if you trust it")
    config = config.model_copy(update={"model": config.model.model_copy(
        update={"trust_remote_code": access.trust_remote_code})})
    return UsableRun(run_dir=run_dir, config=config, record=record, adapter_dir=adapter_dir)
