"""The run directory's contract: its paths, status, identity, liveness, and the check before it is used.

A finished run directory holds:
    adapter_config.json, adapter_model.safetensors   the adapter, standard peft format
    tokenizer files + chat_template                  the training template, for apply_chat_template
    config.yaml                                      the resolved config
    data_report.json                                 what the data stage read, kept, dropped and truncated
    metrics.jsonl, loss.png                          every logged step, and the loss curve
    train.log                                        what loraft decided (e.g. tied embeddings)
    loraft_run.json                                  status, versions, base model, template, identity, timings,
                                                     the training process (pid, host, started_at) and total_steps
    loraft_run.lock                                  flock'd by the training process (rank 0) for its whole life
    checkpoints/checkpoint-N                         Trainer checkpoints, for --resume

Every file is written to a temporary name and renamed, every directory through a staged directory (both in
loraft.files). A run directory is usable as it is when its `loraft_run.json` says `finished` (or it has none: an
adapter directory made by hand) and it holds the adapter. Anything else is refused unless asked for: an
unfinished or failed run's newest complete checkpoint with `--allow-unfinished`, and modelling code from the base
model's folder (`trust_remote_code` in the run's config.yaml, which anyone who wrote the folder controls) only
with `--trust-remote-code` on the command line.

Liveness: the record alone cannot tell a live run from a killed one (a SIGKILL leaves `running`), so the training
process holds an exclusive flock on `loraft_run.lock` from before its first write to its exit; the OS releases it
when the process ends, however it ends. `run_state` reads the status a user should see: `running` only while the
lock is held, `interrupted` when the record says running but the lock is free, `running?` for a run recorded on
another host (its lock is not visible from here), else the record's own (`finished`, `failed`, `stopped`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional, Union

from loraft import gguf_base
from loraft.config import RunConfig, load_config
from loraft.errors import ModelError, RunError
# re-exported for the modules that still import them from here (train, generate)
from loraft.files import write_json_atomically, write_text_atomically

logger = logging.getLogger("loraft")

RUN_FILE = "loraft_run.json"
LOCK_FILE = "loraft_run.lock"
# The output (stdout and stderr) of a run started detached, by `loraft ui`: appended by every start, written before
# `loraft train` prepares the directory, so like the lock file it does not make the directory "not empty".
CONSOLE_FILE = "console.log"
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


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint-N folders that were fully written (staging dirs never carry that name), by step."""
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and child.name[11:].isdigit():
            if (child / "trainer_state.json").is_file():
                steps.append((int(child.name[11:]), child))
    return [path for _, path in sorted(steps)]


def last_complete_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The newest checkpoint-N that was fully written."""
    found = complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _named_checkpoint(run_dir: Path, name: str) -> Path:
    """A complete checkpoint of the run by its name (`checkpoint-N`); a checkpoint can be used whatever the status."""
    checkpoints = run_dir / CHECKPOINTS
    if not (name.startswith("checkpoint-") and name[11:].isdigit()):
        raise RunError(f"{run_dir}: {name!r} is not a checkpoint name (checkpoint-N)")
    path = checkpoints / name
    if not (path / "trainer_state.json").is_file() or not (path / "adapter_config.json").is_file():
        found = sorted((c.name for c in checkpoints.iterdir() if c.name.startswith("checkpoint-")),
                       key=lambda n: int(n[11:]) if n[11:].isdigit() else -1) if checkpoints.is_dir() else []
        raise RunError(f"{run_dir}: no complete checkpoint {name} (checkpoints: {', '.join(found) or 'none'})")
    return path


def open_run(run_dir: Union[str, Path], access: RunAccess = RunAccess()) -> UsableRun:
    """Check a run directory before any model is loaded; one sentence (RunError) when it cannot be used."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    record = read_record(run_dir)
    status = record.get("status")
    has_adapter = (run_dir / "adapter_config.json").is_file()
    if access.checkpoint is not None:
        adapter_dir = _named_checkpoint(run_dir, access.checkpoint)
    elif status in (None, "finished"):
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
    try:  # a GGUF base must be the file the adapter was trained on
        gguf_base.check_unchanged((record.get("identity") or {}).get("model.gguf"), f"run {run_dir}")
    except ModelError as exc:
        raise RunError(str(exc)) from None
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


# --------------------------------------------------------------------------------------------------- liveness
_HELD_LOCKS: set[int] = set()  # this process's lock descriptors, closed in a forked child
_FORK_HOOK_INSTALLED = False


def _close_locks_in_forked_child() -> None:
    # A forked child (a DataLoader worker, a datasets.map pool) inherits the descriptor and with it the flock;
    # closing its copy keeps the lock the trainer's alone, released when the trainer ends even if a child lingers.
    for descriptor in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD_LOCKS.clear()


def local_time(seconds: Optional[float] = None) -> str:
    """A moment as ISO 8601 local time with its UTC offset (the record's `started_at`, `stopped_at`)."""
    return datetime.fromtimestamp(time.time() if seconds is None else seconds).astimezone().isoformat(
        timespec="seconds")


class RunLock:
    """The run's liveness: an exclusive flock on `loraft_run.lock`, held by the training process for its life.

    The OS releases a flock when its process ends, however it ends (SIGKILL, a crash, OOM), so a held lock means
    a live trainer. The file itself is never removed (removing a lock file races with the next taker); its presence
    means nothing, only the lock does.
    """

    def __init__(self, run_dir: Union[str, Path]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._descriptor: Optional[int] = None

    def acquire(self, attempts: int = 20) -> "RunLock":
        """Take the lock, or raise RunError (one sentence) when another process holds it."""
        global _FORK_HOOK_INSTALLED
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"{self.path}: cannot open the run's lock file ({exc.strerror})") from None
        for _ in range(attempts):
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)  # a reader's probe (lock_is_held) holds it for microseconds, a trainer for hours
        else:
            os.close(descriptor)
            raise RunError(_busy_message(self.run_dir))
        if not _FORK_HOOK_INSTALLED:
            os.register_at_fork(after_in_child=_close_locks_in_forked_child)
            _FORK_HOOK_INSTALLED = True
        _HELD_LOCKS.add(descriptor)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Release the lock (closing the descriptor releases the flock)."""
        if self._descriptor is not None:
            _HELD_LOCKS.discard(self._descriptor)
            os.close(self._descriptor)
            self._descriptor = None


def _busy_message(run_dir: Path) -> str:
    record = read_record(run_dir)
    holder = f"pid {record.get('pid')} on {record.get('host')}" if record.get("pid") else "another process"
    return (f"{run_dir}: a training run is live in it ({holder} holds {LOCK_FILE}); stop it first with "
            f"`loraft stop {run_dir}`, or choose another output_dir")


def lock_is_held(run_dir: Union[str, Path]) -> Optional[bool]:
    """Whether a live process holds the run's lock: probed with a shared flock, released at once (a shared probe
    never blocks another reader). None when the lock file exists but cannot be opened here."""
    try:
        descriptor = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # releases the probe's shared lock
    return False


def _last_metrics(path: Path, tail_bytes: int = 1 << 16) -> tuple[Optional[int], Optional[float]]:
    """The last logged step and the last training loss, read from the end of metrics.jsonl (a long run's file is
    not read whole unless its tail holds no loss)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            start = max(0, size - tail_bytes)
            handle.seek(start)
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    step = loss = None
    for line in reversed(lines[1:] if start else lines):  # the tail's first line may be cut
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        step = record["step"] if step is None else step
        if isinstance(record.get("loss"), (int, float)):
            loss = record["loss"]
            break
    if loss is None and start:
        return step, _last_metrics(path, size + 1)[1]
    return step, loss


def run_state(run_dir: Union[str, Path]) -> dict:
    """The run as it is now, for `loraft runs`, `loraft stop` and a UI: the record's status made live.

    `status` is `running` only while the run's lock is held; `interrupted` when the record says running but the
    lock is free (the process ended without a final status: killed, crashed, the machine went down); `running?`
    when the record says running on another host, whose lock this host cannot trust (a network file system may not
    share flocks), so loraft does not guess; else the record's own (`finished`, `failed`, `stopped`, `unreadable`).

    Returns:
        {"run_dir", "name", "status", "recorded_status", "step" (last logged), "total_steps", "loss" (last logged
        training loss), "checkpoint" (newest complete one), "started_at", "pid", "host", "base_model"}.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    recorded = record.get("status")
    status = recorded
    if recorded == "running":
        host = record.get("host")
        if host and host != socket.gethostname():
            status = "running?"
        else:
            held = lock_is_held(run_dir)
            status = "running?" if held is None else "running" if held else "interrupted"
    step, loss = _last_metrics(run_dir / "metrics.jsonl")
    if step is None:
        step = record.get("global_step", record.get("step"))
    started_at = record.get("started_at")
    if started_at is None and isinstance(record.get("started"), (int, float)):  # an older loraft's record
        started_at = local_time(record["started"])
    checkpoint = last_complete_checkpoint(run_dir / CHECKPOINTS)
    return {"run_dir": str(run_dir), "name": run_dir.name, "status": status, "recorded_status": recorded,
            "step": step, "total_steps": record.get("total_steps"), "loss": loss,
            "checkpoint": checkpoint.name if checkpoint else None, "started_at": started_at,
            "pid": record.get("pid"), "host": record.get("host"), "base_model": record.get("base_model")}


def find_runs(root: Union[str, Path], depth: int = 2, within: Optional[Path] = None) -> list[Path]:
    """The run directories (holding loraft_run.json) at `root` and up to `depth` levels below it, by path.

    A run's own folders (checkpoints, eval) are not searched; hidden folders neither; with `within` (a resolved
    folder), neither is a folder whose real path (symbolic links followed) lies outside it.
    """
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: directory not found")

    def searched(child: Path) -> bool:
        if child.name.startswith(".") or not child.is_dir():
            return False
        if within is None or not child.is_symlink():
            return True
        real = child.resolve()
        return real == within or within in real.parents

    found, level = [], [root]
    for current_depth in range(depth + 1):
        below = []
        for directory in level:
            if (directory / RUN_FILE).is_file():
                found.append(directory)
            elif current_depth < depth:
                with contextlib.suppress(OSError):
                    below += sorted(child for child in directory.iterdir() if searched(child))
        level = below
    return sorted(found)


def stop_run(run_dir: Union[str, Path], timeout: float = 120.0, poll_seconds: float = 0.2, wait: bool = True) -> dict:
    """Ask a live run on this host to stop (SIGTERM to its training process) and wait until that process ended.

    The trainer finishes its optimizer step, saves a checkpoint and records `stopped`; a signal that arrives during
    the final save lets the run finish. Calling this again while it stops sends a second SIGTERM: that one aborts
    at once, and the previous checkpoint stays intact.

    Args:
        wait: False returns as soon as the signal is sent (a UI answers at once and watches the status).
    Returns:
        the run's `run_state` once its lock is free (with wait=False: right after the signal).
    Raises:
        RunError (one sentence): not a run, not running, started on another host, still running after `timeout`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    if not (run_dir / RUN_FILE).is_file():
        raise RunError(f"{run_dir}: not a loraft run (no {RUN_FILE})")
    state = run_state(run_dir)
    if state["status"] == "running?":
        raise RunError(f"{run_dir}: {RUN_FILE} says running on host {state['host']!r}, not this host "
                       f"({socket.gethostname()!r}); run loraft stop there")
    if state["status"] != "running":
        raise RunError(f"{run_dir}: the run is not running (status {state['status']}); nothing to stop")
    pid = state["pid"]
    if not isinstance(pid, int):
        raise RunError(f"{run_dir}: {RUN_FILE} has no pid (written by an older loraft); stop its process where it runs")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise RunError(f"{run_dir}: its training process (pid {pid} in {RUN_FILE}) has already ended") from None
    except PermissionError:
        raise RunError(f"{run_dir}: not allowed to signal its training process (pid {pid} in {RUN_FILE}, "
                       "another user's)") from None
    if not wait:
        return run_state(run_dir)
    deadline = time.monotonic() + timeout
    while lock_is_held(run_dir):
        if time.monotonic() > deadline:
            raise RunError(f"{run_dir}: still running {timeout:g} s after SIGTERM to pid {pid} (it stops after its "
                           "current step and checkpoint); wait longer with --timeout, or run loraft stop again to "
                           "abort at once")
        time.sleep(poll_seconds)
    return run_state(run_dir)


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
        "model.adapter_from": adapter_source_identity(config.model.adapter_from),
        "model.gguf": gguf_base.identity(config.model.name_or_path),  # a GGUF base: its path, size and sha256
    }


def adapter_source_identity(run_dir: Optional[str]) -> Optional[dict]:
    """Which finished run an adapter_from names: its path and when it started and finished (a run trained again
    in the same directory is another source)."""
    if not run_dir:
        return None
    record = read_record(run_dir)
    return {"path": str(Path(run_dir).resolve()), "started": record.get("started"),
            "finished": record.get("finished")}


_NOT_PREPARED = object()


class RunDir:
    """One run directory: its paths, its record (`loraft_run.json`), its identity, and its lifecycle.

    Training goes through `prepare` (refuse to overwrite, find the checkpoint to resume), `start`, `mark`,
    `check_resume_identity`; every consumer (chat, generate, eval, merge, serve) through `require_usable`.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._prepared_status = _NOT_PREPARED  # the status prepare() saw, checked again by start() under the lock

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
        self.update(status=status, **fields)

    def update(self, **fields) -> None:
        """Update fields of the record (e.g. `total_steps` once known), keeping what it already says."""
        self.write_record({**self.record(), **fields})

    # ------------------------------------------------------------------------------------------- liveness
    def lock(self) -> RunLock:
        """The run's lock (not yet taken): the training process holds it for its whole life."""
        return RunLock(self.path)

    def state(self) -> dict:
        """The run as it is now (`run_state`): the record's status made live, step, total_steps, last loss."""
        return run_state(self.path)

    # ------------------------------------------------------------------------------------------- training
    def prepare(self, config: RunConfig, resume: bool) -> Optional[Path]:
        """Refuse a live run (its lock held) and, unless asked, a finished or foreign one; find the checkpoint to
        resume from. The status seen here is checked again by `start`, under the lock.

        Returns:
            the checkpoint to resume from, or None for a fresh start.
        """
        run_dir, status = self.path, self.status()
        if lock_is_held(run_dir):
            raise RunError(_busy_message(run_dir))
        self._prepared_status = status
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
        # the lock file of a process killed before its first record, and a detached start's console, are not a
        # user's files
        if (run_dir.is_dir() and any(p.name not in (LOCK_FILE, CONSOLE_FILE) for p in run_dir.iterdir())
                and status is None
                and not config.overwrite):
            raise RunError(f"{run_dir}: exists and is not empty; choose another output_dir or pass overwrite=true")
        if status is not None and status != "finished" and not config.overwrite:
            if self.last_checkpoint() is not None:
                raise RunError(
                    f"{run_dir}: holds an unfinished run with checkpoints; pass --resume to continue it "
                    "or overwrite=true to start again"
                )
        return None

    def start(self, config: RunConfig, resume_from: Optional[Path], total_steps: Optional[int] = None) -> dict:
        """Make the directory a running loraft run (rank 0 only, holding the run's lock).

        The record says running, with this process, before anything else lands (so `loraft stop` never reads an
        earlier process's pid beside a held lock); then a resumed run's metrics are trimmed to its checkpoint, or an
        earlier run's files cleared before a fresh start.

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
            self.trim_metrics(int(resume_from.name[len("checkpoint-"):]))
        elif previous.get("status") is not None:  # prepare() allowed a fresh start over an earlier run
            self.clear_previous()
        return process

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

    # ------------------------------------------------------------------------------------------ consumers
    def require_usable(self, access: RunAccess = RunAccess()) -> UsableRun:
        """The one check before chat, generate, eval, merge or serve load anything (see the module doc)."""
        return open_run(self.path, access)
