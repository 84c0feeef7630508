"""The run directory's contract: its paths, status, identity, and the check before it is used.

A finished run directory holds:
    adapter_config.json, adapter_model.safetensors   the adapter, standard peft format
    tokenizer files + chat_template                  the training template, for apply_chat_template
    config.yaml                                      the resolved config
    data_report.json                                 what the data stage read, kept, dropped and truncated
    metrics.jsonl, loss.png                          every logged step, and the loss curve
    train.log                                        what loraft decided (e.g. tied embeddings)
    loraft_run.json                                  status, versions, base model, template, identity, timings
    checkpoints/checkpoint-N                         Trainer checkpoints, for --resume

Every file is written to a temporary name and renamed, every directory through a staged directory (both in
loraft.files). A run directory is usable as it is when its `loraft_run.json` says `finished` (or it has none: an
adapter directory made by hand) and it holds the adapter. Anything else is refused unless asked for: an
unfinished or failed run's newest complete checkpoint with `--allow-unfinished`, and modelling code from the base
model's folder (`trust_remote_code` in the run's config.yaml, which anyone who wrote the folder controls) only
with `--trust-remote-code` on the command line.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from loraft.config import RunConfig, load_config
from loraft.errors import RunError
# re-exported for the modules that still import them from here (train, generate)
from loraft.files import write_json_atomically, write_text_atomically

logger = logging.getLogger("loraft")

RUN_FILE = "loraft_run.json"
CHECKPOINTS = "checkpoints"
# What a run writes into its directory besides checkpoints/: a fresh start clears these of an earlier run.
RUN_RECORDS = (
    "metrics.jsonl", "loss.png", "train.log", "config.yaml", "data_report.json", "adapter_config.json",
    "adapter_model.safetensors", "adapter_model.bin", "README.md", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
)


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


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut off by a crash or a full disk is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def run_identity(config: RunConfig, report: dict) -> dict:
    """What makes a run's function: a resume that changes any of these continues a different training."""
    return {
        "model.name_or_path": config.model.name_or_path, "model.revision": config.model.revision,
        # the template the run resolved (auto: the model's own or human_assistant), as the data report names it
        "data.template": report.get("template") or config.data.template, "data.max_length": config.data.max_length,
        "the training data (its content, tokenizer or field mapping)": report.get("fingerprint"),
        "adapter": config.adapter.model_dump(), "train.seed": config.train.seed,
    }


class RunDir:
    """One run directory: its paths, its record (`loraft_run.json`), its identity, and its lifecycle.

    Training goes through `prepare` (refuse to overwrite, find the checkpoint to resume), `start`, `mark`,
    `check_resume_identity`; every consumer (chat, generate, eval, merge, serve) through `require_usable`.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    # ---------------------------------------------------------------------------------------------- paths
    @property
    def record_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def data_report_file(self) -> Path:
        return self.path / "data_report.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def log_file(self) -> Path:
        return self.path / "train.log"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def last_checkpoint(self) -> Optional[Path]:
        return last_complete_checkpoint(self.checkpoints)

    # --------------------------------------------------------------------------------------------- record
    def record(self) -> dict:
        return read_record(self.path)

    def status(self) -> Optional[str]:
        return self.record().get("status")

    def write_record(self, payload: dict) -> None:
        write_json_atomically(self.record_file, payload)

    def mark(self, status: str, **fields) -> None:
        """Update the record's status (and fields), keeping what it already says."""
        self.write_record({**self.record(), "status": status, **fields})

    # ------------------------------------------------------------------------------------------- training
    def prepare(self, config: RunConfig, resume: bool) -> Optional[Path]:
        """Refuse to overwrite a finished run; find the checkpoint to resume from.

        Returns:
            the checkpoint to resume from, or None for a fresh start.
        """
        run_dir, status = self.path, self.status()
        if resume:
            checkpoint = self.last_checkpoint()
            if checkpoint is None:
                raise RunError(f"{run_dir}: --resume found no complete checkpoint under {self.checkpoints}")
            if status == "finished" and not config.overwrite:
                raise RunError(f"{run_dir}: the run already finished; pass overwrite=true to train it again")
            return checkpoint
        if status == "finished" and not config.overwrite:
            raise RunError(
                f"{run_dir}: holds a finished run; choose another output_dir or pass overwrite=true to replace it"
            )
        if run_dir.is_dir() and any(run_dir.iterdir()) and status is None and not config.overwrite:
            raise RunError(f"{run_dir}: exists and is not empty; choose another output_dir or pass overwrite=true")
        if status is not None and status != "finished" and not config.overwrite:
            if self.last_checkpoint() is not None:
                raise RunError(
                    f"{run_dir}: holds an unfinished run with checkpoints; pass --resume to continue it "
                    "or overwrite=true to start again"
                )
        return None

    def start(self, config: RunConfig, resume_from: Optional[Path]) -> None:
        """Make the directory a running loraft run (rank 0 only): trim a resumed run's metrics to its checkpoint,
        or clear an earlier run's files before a fresh start, and mark it running before anything else lands."""
        if resume_from is not None:
            self.trim_metrics(int(resume_from.name[len("checkpoint-"):]))
        elif self.status() is not None:  # prepare() allowed a fresh start over an earlier run
            self.clear_previous()
            self.write_record({"status": "running", "base_model": config.model.name_or_path, "started": time.time()})
        self.path.mkdir(parents=True, exist_ok=True)
        if self.status() is None:
            self.write_record({"status": "running", "base_model": config.model.name_or_path, "started": time.time()})

    def clear_previous(self) -> None:
        """Remove an earlier run's adapter, records, evaluation and checkpoints before a fresh start here.

        A fresh start (overwrite=true, or an unfinished run that left no checkpoint) must not leave the old
        adapter beside the new config if it is killed, nor append to the old run's metrics.
        """
        for name in RUN_RECORDS:
            (self.path / name).unlink(missing_ok=True)
        for name in (CHECKPOINTS, "eval", ".adapter-staging", ".tokenizer-staging"):  # the last two: loraft < 0.2
            shutil.rmtree(self.path / name, ignore_errors=True)
        for stale in self.path.glob(".*-staging-*"):  # a staged directory a killed process left behind
            shutil.rmtree(stale, ignore_errors=True)

    def trim_metrics(self, last_step: int) -> None:
        """Keep the metrics logged up to `last_step` (the checkpoint a resume starts from), so the steps between
        that checkpoint and a crash are logged once, by the resumed run; rewritten atomically."""
        if not self.metrics_file.is_file():
            return
        # the end-of-training summary (train_loss, ...) is written again by the resumed run
        kept = [r for r in read_metrics(self.metrics_file) if r["step"] <= last_step and "train_loss" not in r]
        write_text_atomically(self.metrics_file, "".join(json.dumps(record) + "\n" for record in kept))

    @staticmethod
    def identity_fields(config: RunConfig, report: dict) -> dict:
        """The record's `identity` (checked on resume) and `length` (which a resume may extend)."""
        return {"identity": run_identity(config, report),
                "length": {"train.max_steps": config.train.max_steps,
                           "train.num_train_epochs": config.train.num_train_epochs}}

    def check_resume_identity(self, config: RunConfig, report: dict) -> None:
        """Refuse a resume whose config changes the function the checkpoint was trained for (one sentence);
        log an extension (more max_steps or epochs)."""
        saved = self.record()
        if "identity" not in saved:
            logger.warning("%s: the run records no identity (an older loraft); resuming without checking it",
                           self.path)
            return
        current = run_identity(config, report)
        for key, old in saved["identity"].items():
            new = current.get(key)
            if key == "adapter" and old != new:
                changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
                key, old, new = f"adapter.{changed[0]}", old.get(changed[0]), new.get(changed[0])
            if old != new:
                raise RunError(f"{self.path}: --resume refused: {key} changed ({old!r} -> {new!r}) since the "
                               "checkpoint was trained; start a new output_dir, or pass overwrite=true to train "
                               "again from scratch")
        previous = saved.get("length") or {}
        for key, value in (("train.max_steps", config.train.max_steps),
                           ("train.num_train_epochs", config.train.num_train_epochs)):
            if key in previous and previous[key] != value:
                logger.info("resume extends the run: %s %s -> %s", key, previous[key], value)

    # ------------------------------------------------------------------------------------------ consumers
    def require_usable(self, access: RunAccess = RunAccess()) -> UsableRun:
        """The one check before chat, generate, eval, merge or serve load anything (see the module doc)."""
        return open_run(self.path, access)
