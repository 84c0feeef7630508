"""What the UI reads of a process it launched: whether it still runs the command it was started with, and the
lines of its console log (the last ones, and the one-sentence failure a loraft command printed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def process_alive(pid: Optional[int], argv: Optional[list[str]]) -> bool:
    """Whether process `pid` still runs the command `argv` it was started with.

    The command guards against a recycled pid: a UI restarted long after its launch must not take an unrelated
    process for the trainer it started. A zombie (ended, not yet reaped by its parent) is not alive.
    """
    if not isinstance(pid, int) or pid <= 0 or not argv:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # no /proc (macOS): the signal probe is all there is
        return True
    try:
        stat = (proc / "stat").read_text()
        running = (proc / "cmdline").read_bytes().decode("utf-8", "surrogateescape").split("\0")[:-1]
    except OSError:
        return False  # it ended between the probe and the read
    return stat.rpartition(")")[2].split()[0] != "Z" and running == list(argv)


def tail_lines(path: Path, count: int, max_bytes: int = 1 << 20) -> list[str]:
    """The last `count` lines of a text file ([] when it is missing), reading at most its last `max_bytes`."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            handle.seek(max(0, size - max_bytes))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    if size > max_bytes:
        lines = lines[1:]  # the first line read may be cut
    return lines[-count:] if count > 0 else []


def last_error_line(path: Path) -> Optional[str]:
    """The one-sentence failure a loraft command printed (`error: ...`) in a console log, else its last line
    (a traceback's exception); None when the log is empty."""
    lines = [line.strip() for line in tail_lines(path, 400) if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return lines[-1] if lines else None
