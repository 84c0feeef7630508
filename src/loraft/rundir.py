"""The run directory's contract: its paths and its record (begun and finished here).

A finished run directory holds the adapter (adapter_config.json, adapter_model.safetensors: standard peft format),
the tokenizer files with the training template as their chat_template (for apply_chat_template), and the files
named below, each through a RunDir property; every other module names them through this one. Every file is written
to a temporary name and renamed, every directory through a staged directory (both in loraft.files). The check
before a run is used is loraft.run_access (`open_run`); whether its trainer lives, loraft.liveness.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Union

from loraft import gguf_base
from loraft.config import RunConfig
from loraft.errors import RunError
from loraft.files import write_json_atomically, write_text_atomically

logger = logging.getLogger("loraft")

RUN_FILE = "loraft_run.json"  # the record: status, versions, base model, template, identity, timings, the process
LOCK_FILE = "loraft_run.lock"  # flock'd by the training process (rank 0) for its whole life: loraft.liveness
# The output (stdout and stderr) of a run started detached, by `loraft ui`: appended by every start, written before
# `loraft train` prepares the directory, so like the lock file it does not make the directory "not empty".
CONSOLE_FILE = "console.log"
CONFIG_FILE = "config.yaml"  # the resolved config
DATA_REPORT_FILE = "data_report.json"  # what the data stage read, kept, dropped and truncated
METRICS_FILE, LOSS_PLOT = "metrics.jsonl", "loss.png"  # every logged step, and the loss curve
COMPLETIONS_FILE = "completions.jsonl"  # GRPO: sampled completions with their rewards, at each logging step
LOG_FILE = "train.log"  # what loraft decided (e.g. tied embeddings)
CHECKPOINTS = "checkpoints"  # Trainer's checkpoints, checkpoint-N, for --resume
EVAL_DIR = "eval"  # what `loraft eval` measured last: EVAL_METRICS and EVAL_PREDICTIONS
EVAL_METRICS, EVAL_PREDICTIONS = "metrics.json", "predictions.jsonl"
# named by the libraries that write them (peft, Trainer): read here to tell an adapter or a complete checkpoint
ADAPTER_CONFIG, TRAINER_STATE = "adapter_config.json", "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"  # Trainer's checkpoint folders: checkpoint-STEP (its PREFIX_CHECKPOINT_DIR)
CHECKPOINT_NAME = re.compile(CHECKPOINT_PREFIX + "([0-9]+)")
# What a run writes into its directory besides checkpoints/: a fresh start clears these of an earlier run.
RUN_RECORDS = (
    METRICS_FILE, COMPLETIONS_FILE, LOSS_PLOT, LOG_FILE, CONFIG_FILE, DATA_REPORT_FILE, ADAPTER_CONFIG, "adapter_model.safetensors",
    "adapter_model.bin", "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
)
_NOT_PREPARED = object()  # a RunDir's prepared status before prepare() ran


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


def checkpoint_step(path_or_name: Union[str, Path]) -> int:
    """The step N of a checkpoint folder `checkpoint-N`, by its name (a string: a bare name, never a path) or its
    path; ValueError for any other name."""
    name = path_or_name.name if isinstance(path_or_name, Path) else path_or_name
    match = CHECKPOINT_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a checkpoint name ({CHECKPOINT_PREFIX}N)")
    return int(match.group(1))


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint-N folders that were fully written (staging dirs never carry that name), by step."""
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and CHECKPOINT_NAME.fullmatch(child.name) and (child / TRAINER_STATE).is_file():
            steps.append((checkpoint_step(child), child))
    return [path for _, path in sorted(steps)]


def last_complete_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The newest checkpoint-N that was fully written."""
    return (complete_checkpoints(checkpoint_dir) or [None])[-1]


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


def local_time(seconds: Optional[float] = None) -> str:
    """A moment as ISO 8601 local time with its UTC offset (the record's `started_at`, `stopped_at`)."""
    return datetime.fromtimestamp(time.time() if seconds is None else seconds).astimezone().isoformat(
        timespec="seconds")


def run_identity(config: RunConfig, report: dict) -> dict:
    """What makes a run's function: a resume that changes any of these continues a different training."""
    return {
        "model.name_or_path": config.model.name_or_path, "model.revision": config.model.revision,
        # the template the run resolved (auto: the model's own or human_assistant), as the data report names it
        "data.template": report.get("template") or config.data.template, "data.max_length": config.data.max_length,
        "the training data (its content, tokenizer or field mapping)": report.get("fingerprint"),
        "adapter": config.adapter.model_dump(), "train.seed": config.train.seed,
        "train.objective": config.train.objective,
        "preference": (config.preference.model_dump(exclude={"max_prompt_length", "max_completion_length"})
                       if config.train.objective != "sft" else None),  # the limits are in the data fingerprint
        # GRPO: the rewards, the sampling and the loss (what completions.jsonl keeps does not change the training)
        "grpo": (config.grpo.model_dump(exclude={"completions_logged"}) if config.train.objective == "grpo"
                 else None),
        "model.adapter_from": adapter_source_identity(config.model.adapter_from),
        "model.gguf": gguf_base.identity(config.model.name_or_path),  # a GGUF base: its path, size and sha256
    }


def adapter_source_identity(run_dir: Optional[str]) -> Optional[dict]:
    """Which finished run an adapter_from names: its path and when it started and finished (a run trained again
    in the same directory is another source)."""
    if not run_dir:
        return None
    record = read_record(run_dir)
    return {"path": str(Path(run_dir).resolve()), "started": record.get("started"), "finished": record.get("finished")}


def _file(name: str) -> property:  # a RunDir property: the path of `name` in the run directory
    return property(lambda run: run.path / name, doc=f"the run's {name}")


class RunDir:
    """One run directory: its paths, its record (`loraft_run.json`), its identity, and its lifecycle. Training goes
    through `prepare` (refuse to overwrite, find the checkpoint to resume), `start` (under the run's lock:
    loraft.liveness), `check_resume_identity`, `begin`, then `finish` or `mark` (failed, stopped); every consumer
    (chat, generate, eval, merge, serve) through `open_run`."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._prepared_status = _NOT_PREPARED  # the status prepare() saw, checked again by start() under the lock

    # ---------------------------------------------------------------------------------------------- paths
    record_file, lock_file, console_file = _file(RUN_FILE), _file(LOCK_FILE), _file(CONSOLE_FILE)
    config_file, data_report_file, log_file = _file(CONFIG_FILE), _file(DATA_REPORT_FILE), _file(LOG_FILE)
    metrics_file, loss_plot, eval_dir = _file(METRICS_FILE), _file(LOSS_PLOT), _file(EVAL_DIR)
    checkpoints, completions_file = _file(CHECKPOINTS), _file(COMPLETIONS_FILE)

    def write_eval(self, rows, metrics: dict) -> dict:
        """What `loraft eval` measured: eval/predictions.jsonl (one row a record) and eval/metrics.json, each written
        atomically; returns metrics."""
        self.eval_dir.mkdir(exist_ok=True)
        write_text_atomically(self.eval_dir / EVAL_PREDICTIONS, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                                        for row in rows))
        write_text_atomically(self.eval_dir / EVAL_METRICS, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
        return metrics

    def checkpoint(self, step: int) -> Path:
        """Where Trainer saves the checkpoint of `step` (complete once it holds TRAINER_STATE)."""
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

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
        self.update(status=status, **fields)

    def update(self, **fields) -> None:
        """Update fields of the record (e.g. `total_steps` once known), keeping what it already says."""
        self.write_record({**self.record(), **fields})

    @staticmethod
    def _trains(config: RunConfig, template_name: str) -> dict:
        return {"base_model": config.model.name_or_path, "template": template_name,
                "objective": config.train.objective, "adapter_from": config.model.adapter_from}

    def begin(self, config: RunConfig, plan, template_name: str, report: dict, process: dict, started: float,
              versions: dict) -> None:
        """The running record once the data is read (rank 0): what the run trains and how (the loraft.plan.Plan),
        its identity, this process (`start`'s fields) and the versions; `total_steps` as recorded so far."""
        self.write_record({"status": "running", **self._trains(config, template_name), "started": started,
                           **process, "total_steps": self.record().get("total_steps"), "versions": versions,
                           "plan": plan.to_dict(), **self.identity_fields(config, report)})

    def finish(self, config: RunConfig, plan, template_name: str, report: dict, process: dict, started: float,
               versions: dict, *, model_info: dict, trainable_params: int, total_params: int, result,
               resumed_from: Optional[Path]) -> None:
        """The finished record (rank 0, after the adapter and tokenizer are saved): `begin`'s fields with what
        was trained (model_info: load_model_for_training's) and the outcome (`result`: Trainer's TrainOutput)."""
        self.write_record({
            "status": "finished", **self._trains(config, template_name), "adapter_method": config.adapter.method,
            "tied_embeddings": model_info["tied_embeddings"], "target_matches": model_info["target_matches"],
            "trainable_params": trainable_params, "total_params": total_params, "plan": plan.to_dict(),
            "global_step": result.global_step, "total_steps": self.record().get("total_steps"),
            "train_loss": result.training_loss, "train_metrics": result.metrics,
            "resumed_from": str(resumed_from) if resumed_from else None, **self.identity_fields(config, report),
            "started": started, **process, "finished": time.time(), "versions": versions,
        })

    # ------------------------------------------------------------------------------------------- training
    def prepare(self, config: RunConfig, resume: bool) -> Optional[Path]:
        """Refuse, unless asked, a finished or foreign run (a live one: liveness.refuse_if_live, asked first);
        find the checkpoint to resume from. The status seen here is checked again by `start`, under the lock.

        Returns:
            the checkpoint to resume from, or None for a fresh start.
        """
        run_dir, status = self.path, self.status()
        self._prepared_status = status
        if resume:
            checkpoint = self.last_checkpoint()
            if checkpoint is None:
                raise RunError(f"{run_dir}: --resume found no complete checkpoint under {self.checkpoints}")
            if status == "finished" and not config.overwrite:
                raise RunError(f"{run_dir}: the run already finished; pass overwrite=true to train it again")
            return checkpoint
        if status == "finished" and not config.overwrite:
            raise RunError(f"{run_dir}: holds a finished run; choose another output_dir or pass overwrite=true to "
                           "replace it")
        # the lock file of a process killed before its first record, and a detached start's console, are not a
        # user's files
        if (run_dir.is_dir() and any(p.name not in (LOCK_FILE, CONSOLE_FILE) for p in run_dir.iterdir())
                and status is None and not config.overwrite):
            raise RunError(f"{run_dir}: exists and is not empty; choose another output_dir or pass overwrite=true")
        if status is not None and status != "finished" and not config.overwrite and self.last_checkpoint():
            raise RunError(f"{run_dir}: holds an unfinished run with checkpoints; pass --resume to continue it or "
                           "overwrite=true to start again")
        return None

    def start(self, config: RunConfig, resume_from: Optional[Path], total_steps: Optional[int] = None) -> dict:
        """Make the directory a running loraft run (rank 0 only, holding the run's lock): the record says running,
        with this process, before anything else lands (so `loraft stop` never reads an earlier process's pid beside a
        held lock); then a resumed run's metrics are trimmed to its checkpoint, or an earlier run's files cleared.

        Returns:
            this process's fields (`pid`, `host`, `started_at`), which every later record of the run keeps.
        """
        process = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": local_time()}
        previous = self.record()
        if self._prepared_status is not _NOT_PREPARED and previous.get("status") != self._prepared_status:
            # another process changed the directory between prepare() and the lock taken before this call
            raise RunError(f"{self.path}: another process changed the run while this one was starting (status "
                           f"{self._prepared_status} -> {previous.get('status')}); run the command again")
        # a resume keeps what check_resume_identity compares; a fresh start keeps nothing of an earlier run
        kept = {key: previous[key] for key in ("identity", "length") if key in previous} if resume_from else {}
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_record({**kept, "status": "running", "base_model": config.model.name_or_path,
                           "started": time.time(), **process, "total_steps": total_steps})
        if resume_from is not None:
            self.trim_metrics(checkpoint_step(resume_from))
        elif previous.get("status") is not None:  # prepare() allowed a fresh start over an earlier run
            self.clear_previous()
        return process

    def clear_previous(self) -> None:
        """Remove an earlier run's adapter, records, evaluation and checkpoints before a fresh start here: a fresh
        start (overwrite=true, or an unfinished run that left no checkpoint) must not leave the old adapter beside
        the new config if it is killed, nor append to the old run's metrics."""
        for name in RUN_RECORDS:
            (self.path / name).unlink(missing_ok=True)
        for name in (CHECKPOINTS, EVAL_DIR, ".adapter-staging", ".tokenizer-staging"):  # the last two: loraft < 0.2
            shutil.rmtree(self.path / name, ignore_errors=True)
        for stale in self.path.glob(".*-staging-*"):  # a staged directory a killed process left behind
            shutil.rmtree(stale, ignore_errors=True)

    def trim_metrics(self, last_step: int) -> None:
        """Keep the metrics logged up to `last_step` (the checkpoint a resume starts from), so the steps between
        that checkpoint and a crash are logged once, by the resumed run; rewritten atomically."""
        if not self.metrics_file.is_file() and not self.completions_file.is_file():
            return
        # the end-of-training summary (train_loss, ...) is written again by the resumed run
        kept = [r for r in read_metrics(self.metrics_file) if r["step"] <= last_step and "train_loss" not in r]
        write_text_atomically(self.metrics_file, "".join(json.dumps(record) + "\n" for record in kept))
        if self.completions_file.is_file():  # GRPO's completions, logged with the same steps
            kept = [r for r in read_metrics(self.completions_file) if r["step"] <= last_step]
            write_text_atomically(self.completions_file,
                                  "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept))

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
        gguf_base.check_unchanged(saved["identity"].get("model.gguf"), f"run {self.path}")  # naming the file
        current = run_identity(config, report)
        for key, old in saved["identity"].items():
            new = current.get(key)
            if isinstance(old, dict) and isinstance(new, dict) and old != new:  # name the setting that changed
                changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
                key, old, new = f"{key}.{changed[0]}", old.get(changed[0]), new.get(changed[0])
            if old != new:
                raise RunError(f"{self.path}: --resume refused: {key} changed ({old!r} -> {new!r}) since the "
                               "checkpoint was trained; start a new output_dir, or pass overwrite=true to train "
                               "again from scratch")
        previous = saved.get("length") or {}
        for key, value in (("train.max_steps", config.train.max_steps),
                           ("train.num_train_epochs", config.train.num_train_epochs)):
            if key in previous and previous[key] != value:
                logger.info("resume extends the run: %s %s -> %s", key, previous[key], value)
