"""A run's live curve: its metrics.jsonl as server-sent events that a page can re-attach to.

Each complete line of metrics.jsonl is one `metric` event whose id is its line number (from 1), so a client that
reconnects with `Last-Event-ID: N` receives lines N+1 onwards. The file only grows while a run trains; when it
shrinks or is replaced (a resume trims it to its checkpoint, a fresh start clears it) a `reset` event tells the
client to clear its curve, and the lines follow again from the first. A `state` event carries the run's listed
state whenever it changes; the stream ends once a state other than starting or running has been sent and the file
has been read to its end. One coroutine per stream polls the file (no thread); Starlette cancels it when the
client leaves.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from starlette.concurrency import run_in_threadpool

from loraft.ui.workspace import LIVE_STATUSES

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


def sse(event: str, data: str, event_id: Optional[str] = None) -> str:
    """One server-sent event (`data` holds no newline: a JSON line)."""
    return f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "") + f"data: {data}\n\n"


class MetricsReader:
    """Reads the complete lines appended to metrics.jsonl since the last read, numbering them from 1."""

    def __init__(self, path: Path):
        self.path = path
        self.position = 0  # bytes consumed: up to the end of the last complete line
        self.count = 0  # complete lines read
        self.identity: Optional[tuple[int, int]] = None  # (device, inode): an atomic rewrite makes a new file

    def read(self) -> tuple[bool, list[tuple[int, str]]]:
        """(whether the file shrank or was replaced since the last read, the new complete lines as (number, text))."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            shrank = self.count > 0
            self.position = self.count = 0
            self.identity = None
            return shrank, []
        identity = (stat.st_dev, stat.st_ino)
        shrank = False
        if (self.identity is not None and identity != self.identity) or stat.st_size < self.position:
            shrank = self.count > 0
            self.position = self.count = 0
        self.identity = identity
        if stat.st_size <= self.position:
            return shrank, []
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.position)
                data = handle.read(stat.st_size - self.position)
        except OSError:
            return shrank, []
        end = data.rfind(b"\n")
        if end < 0:  # a line being written: sent once it is complete
            return shrank, []
        self.position += end + 1
        lines = []
        for raw in data[:end].split(b"\n"):
            self.count += 1
            lines.append((self.count, raw.decode("utf-8", errors="replace").rstrip("\r")))
        return shrank, lines


async def run_events(metrics_file: Path, read_state: Callable[[], dict], last_event_id: int = 0,
                     last_file: Optional[str] = None, poll_seconds: float = POLL_SECONDS,
                     keepalive_seconds: float = KEEPALIVE_SECONDS) -> AsyncIterator[str]:
    """The event stream of one run (see the module doc).

    Args:
        read_state: the run's state as GET /api/runs lists it (a dict with `status`).
        last_event_id: the last line the client has; lines up to it are not sent again.
        last_file: the file those lines came from (the id's part after `-`): a resume replaces metrics.jsonl
            (trimmed to its checkpoint), and a client that was away meanwhile starts over even if the new file has
            grown past its line number.
    """
    reader = MetricsReader(metrics_file)
    skip, sent_state, first = last_event_id, None, True
    last_sent = time.monotonic()

    def file_tag() -> str:  # the file's inode, in hex: which metrics.jsonl a line number belongs to
        return f"{reader.identity[1]:x}" if reader.identity else "0"

    def new_lines() -> list[str]:
        nonlocal skip, first
        shrank, lines = reader.read()  # after a shrink: the whole new file, numbered from 1
        # a client that holds more lines than the file has (trimmed while it was away) starts over too
        replaced = first and last_file is not None and reader.identity is not None and file_tag() != last_file
        shrank, first = shrank or replaced or (first and skip > reader.count), False
        events = []
        if shrank:
            events.append(sse("reset", "{}"))
            skip = 0
        return events + [sse("metric", text, f"{number}-{file_tag()}") for number, text in lines
                         if number > skip and text.strip()]

    while True:  # file reads and the lock probe in a worker thread: the event loop serves every other request
        events = await run_in_threadpool(new_lines)
        state = await run_in_threadpool(read_state)
        ended = state.get("status") not in LIVE_STATUSES
        if ended:
            # the record is final: whatever the run logged is in the file now
            events += await run_in_threadpool(new_lines)
            state = await run_in_threadpool(read_state)
            ended = state.get("status") not in LIVE_STATUSES
        if state != sent_state:
            events.append(sse("state", json.dumps(state, ensure_ascii=False)))
            sent_state = state
        if events:
            yield "".join(events)
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= keepalive_seconds:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if ended:
            return
        await asyncio.sleep(poll_seconds)

