"""The UI's CPU-bound requests in worker processes, each with a time limit.

What a request asks the UI to compute can run for a long time, on purpose or not: a target pattern that backtracks
(peft matches it with `re.fullmatch`, whose C loop holds the GIL for the whole match, so in a thread it would stall
the event loop and every other request with it), a YAML document of nested aliases, a tokenizer over a large file.
So the plan, `data check`, `data preview` and the config check of a start or resume run in a process of their own,
working in the workspace (a relative name can only mean a file there), for at most `time_limit` seconds. Past it
the process is killed and a fresh one takes its place, and the request gets one sentence. Workers are spawned (a
fresh interpreter with the UI's environment as it is then: never a fork of a process with threads) on first use.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing
import os
import queue
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from loraft.errors import LoraftError
from loraft.ui.workspace import RequestError

logger = logging.getLogger("loraft")

# imported before a worker says it is ready, so a request's time limit counts its own work, not torch's import
PRELOADED = ("loraft.train", "loraft.ui.launch", "loraft.ui.data")


def _serve(connection, root: str) -> None:
    """A worker: load the libraries, say "ready", then run each (function, args) it is sent in the workspace; answer
    ("ok", result), ("refused", status, sentence) or ("bug", traceback)."""
    os.chdir(root)
    for module in PRELOADED:
        importlib.import_module(module)
    connection.send("ready")
    while True:
        try:
            function, args = connection.recv()
        except (EOFError, OSError):  # the UI closed its end: it is going away
            return
        try:
            outcome: tuple = ("ok", function(*args))
        except RequestError as exc:
            outcome = ("refused", exc.status, exc.message)
        except LoraftError as exc:  # a config, data or model the user gave: one sentence
            outcome = ("refused", 400, str(exc))
        except Exception:  # our bug: the UI logs it
            outcome = ("bug", traceback.format_exc())
        connection.send(outcome)


class _Worker:
    def __init__(self, context, root: Path, startup_limit: float):
        self.connection, child = context.Pipe()
        # not a daemon: the data stage may start tokenizing processes of its own
        self.process = context.Process(target=_serve, args=(child, str(root)), name="loraft-ui-work")
        self.process.start()
        child.close()
        try:
            ready = self.connection.poll(startup_limit) and self.connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.stop()
            raise RequestError(400, f"a worker process for the UI's plans and checks did not start within "
                                    f"{startup_limit:g} s (see the UI's log)")

    def stop(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.connection.close()


class Workers:
    """At most `processes` workers; at most `max_waiting` more requests wait for one (429 past that)."""

    def __init__(self, root: Path, processes: int = 2, time_limit: float = 120.0, max_waiting: int = 8,
                 startup_limit: float = 300.0):
        self.root, self.processes, self.time_limit, self.max_waiting = Path(root), processes, time_limit, max_waiting
        self.startup_limit = startup_limit  # a fresh interpreter importing torch: not the request's time
        self._idle: queue.LifoQueue[Optional[_Worker]] = queue.LifoQueue()
        for _ in range(processes):
            self._idle.put(None)  # started on first use
        self._lock = threading.Lock()
        self._pending = 0
        self._all: set[_Worker] = set()
        atexit.register(self.close)  # after multiprocessing's own exit handler: it would wait for them

    def _start(self) -> _Worker:
        worker = _Worker(multiprocessing.get_context("spawn"), self.root, self.startup_limit)
        self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        self._all.discard(worker)
        worker.stop()

    def run(self, what: str, function: Callable, *args) -> Any:
        """`function(*args)` in a worker (blocking: call it from a thread); its refusal raised as a RequestError.

        Args:
            what: the work as the sentences name it ("the plan").
        Raises:
            RequestError: the function's own refusal; 429 when every worker is busy and `max_waiting` requests
                wait; 400 when it ran past the time limit (its process killed) or its process died.
        """
        with self._lock:
            if self._pending >= self.processes + self.max_waiting:
                raise RequestError(429, f"the UI is busy: {self._pending} plans, checks and previews are running or "
                                        "waiting; try again in a moment")
            self._pending += 1
        try:
            worker = self._idle.get()
            try:
                if worker is None or not worker.process.is_alive():
                    worker = self._start()
                worker.connection.send((function, args))
                if not worker.connection.poll(self.time_limit):
                    self._discard(worker)
                    worker = None
                    raise RequestError(400, f"{what} took longer than {self.time_limit:g} s and was stopped (loraft "
                                            "ui --time-limit): a target pattern that backtracks, or more data than "
                                            "this machine checks in that time?")
                outcome = worker.connection.recv()
            except (EOFError, OSError):  # killed from outside, or out of memory
                if worker is not None:
                    self._discard(worker)
                worker = None
                raise RequestError(400, f"{what} stopped: its worker process ended (out of memory?)") from None
            finally:
                self._idle.put(worker)
        finally:
            with self._lock:
                self._pending -= 1
        if outcome[0] == "ok":
            return outcome[1]
        if outcome[0] == "refused":
            raise RequestError(outcome[1], outcome[2])
        logger.error("a UI worker failed on %s:\n%s", what, outcome[1])
        raise RuntimeError(f"{what} hit a bug in loraft (see the UI's log)")

    def warm(self) -> None:
        """Start one worker now (in a thread), so the page's first plan does not wait for torch's import."""

        def start() -> None:
            worker = self._idle.get()
            try:
                if worker is None:
                    worker = self._start()
            except RequestError as exc:
                logger.warning("%s", exc.message)
            finally:
                self._idle.put(worker)

        threading.Thread(target=start, name="loraft-ui-warm", daemon=True).start()

    def close(self) -> None:
        """Stop every worker (the UI is ending)."""
        for worker in list(self._all):
            self._discard(worker)
