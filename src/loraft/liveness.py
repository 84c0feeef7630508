"""The run's liveness: the lock, the status a user should see (running, interrupted, stopped, ...), stopping a run.

The record alone cannot tell a live run from a killed one (a SIGKILL leaves `running`), so the training process holds
an exclusive flock on the run's lock file (loraft.rundir.LOCK_FILE) from before its first write to its exit; the OS
releases it when the process ends, however it ends. `run_state` reads the status a user should see: `running` only
while the lock is held, `interrupted` when the record says running but the lock is free, `running?` for a run
recorded on another host (its lock is not visible from here), else the record's own (`finished`, `failed`,
`stopped`). `stop_run` asks a live run on this host to stop. What the directory holds and its record are
loraft.rundir's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Optional, Union

from loraft.errors import RunError
from loraft.rundir import LOCK_FILE, RUN_FILE, RunDir, local_time, read_record

_HELD_LOCKS: set[int] = set()  # this process's lock descriptors, closed in a forked child
_FORK_HOOK_INSTALLED = False


def _close_locks_in_forked_child() -> None:
    # A forked child (a DataLoader worker, a datasets.map pool) inherits the descriptor and with it the flock;
    # closing its copy keeps the lock the trainer's alone, released when the trainer ends even if a child lingers.
    for descriptor in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD_LOCKS.clear()


class RunLock:
    """The run's liveness: an exclusive flock on `loraft_run.lock`, held by the training process for its life.

    The OS releases a flock when its process ends, however it ends (SIGKILL, a crash, OOM), so a held lock means
    a live trainer. The file itself is never removed (removing a lock file races with the next taker); its presence
    means nothing, only the lock does.
    """

    def __init__(self, run_dir: Union[str, Path]):
        self.run_dir = Path(run_dir)
        self.path = RunDir(self.run_dir).lock_file
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
        descriptor = os.open(RunDir(run_dir).lock_file, os.O_RDONLY)
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


def refuse_if_live(run_dir: Union[str, Path]) -> None:
    """Refuse (RunError, one sentence) a directory whose lock a live trainer holds: `loraft train` asks before it
    loads anything, and takes the lock itself once it knows it is rank 0."""
    if lock_is_held(run_dir):
        raise RunError(_busy_message(Path(run_dir)))


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
    run = RunDir(run_dir)
    run_dir, record = run.path, run.record()
    recorded = record.get("status")
    status = recorded
    if recorded == "running":
        host = record.get("host")
        if host and host != socket.gethostname():
            status = "running?"
        else:
            held = lock_is_held(run_dir)
            status = "running?" if held is None else "running" if held else "interrupted"
    step, loss = _last_metrics(run.metrics_file)
    if step is None:
        step = record.get("global_step", record.get("step"))
    started_at = record.get("started_at")
    if started_at is None and isinstance(record.get("started"), (int, float)):  # an older loraft's record
        started_at = local_time(record["started"])
    checkpoint = run.last_checkpoint()
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
    if not RunDir(run_dir).record_file.is_file():
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
