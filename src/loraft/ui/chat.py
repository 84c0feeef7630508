"""Chat with a run, one of its checkpoints, or its base model, through `loraft serve`'s own page and API.

`/chat/NAME/` is the chat page of loraft.serve; it calls `v1/models` and `v1/chat/completions` relative to itself,
with its own query (`?checkpoint=checkpoint-N`, `?base=1`), so they arrive at `/chat/NAME/v1/...` and are handed to
loraft.serve's app for that model, with the `/chat/NAME` prefix moved into the ASGI root_path. A model is loaded on
first use in a worker thread (the event loop keeps answering), and at most two stay loaded, the least recently
used going first: each is a whole model in memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from loraft.rundir import CHECKPOINT_NAME, read_record
from loraft.ui.workspace import RequestError, Workspace

# the keys of an HTTP connection scope (ASGI spec); the outer app's routing keys stay behind
ASGI_HTTP_KEYS = ("type", "asgi", "http_version", "server", "client", "scheme", "method", "root_path", "path",
                  "raw_path", "query_string", "headers", "state", "extensions")


class Forward(Response):
    """A response that hands the request to another ASGI app mounted at `prefix` (it sees `/v1/...`)."""

    def __init__(self, app, prefix: str):
        super().__init__()
        self.app, self.prefix = app, prefix

    async def __call__(self, scope, receive, send) -> None:
        child = {key: scope[key] for key in ASGI_HTTP_KEYS if key in scope}
        child["root_path"] = scope.get("root_path", "") + self.prefix
        await self.app(child, receive, send)


def chat_query(checkpoint: Optional[str], base: Optional[str]) -> tuple[Optional[str], bool]:
    """The page's query checked: (checkpoint name or None, whether the base model without the adapter)."""
    if checkpoint is not None and not CHECKPOINT_NAME.fullmatch(checkpoint):
        raise RequestError(400, f"checkpoint must be a checkpoint's name like checkpoint-200 (got {checkpoint!r})")
    if base not in (None, "", "0", "1", "true", "false"):
        raise RequestError(400, f"base must be 1 or 0 (got {base!r})")
    return checkpoint, base in ("1", "true")


class ChatModels:
    """The chat apps of loaded models, keyed by (run, checkpoint or None, base), at most `capacity` of them."""

    def __init__(self, workspace: Workspace, capacity: int = 2, max_loading: Optional[int] = None):
        self.workspace, self.capacity = workspace, capacity
        self.max_loading = capacity if max_loading is None else max_loading  # loads at once (429 past it)
        self._loaded: OrderedDict[tuple, tuple[tuple, object]] = OrderedDict()  # key -> (run signature, app)
        self._loading: dict[tuple, asyncio.Task] = {}
        self._releasing: set[asyncio.Task] = set()  # kept referenced until they end

    @staticmethod
    def _signature(run_dir: Path) -> tuple:
        # a model loaded before the run was resumed or trained again is not the run's model any more
        record = read_record(run_dir)
        return record.get("status"), record.get("started_at"), record.get("finished")

    async def app_for(self, name: str, checkpoint: Optional[str], base: bool):
        """The loraft.serve app of the run's model (loaded now if it is not); 404 for an unknown run, 409 for a
        run still training without a checkpoint named, 400 (LoraftError) for what cannot be loaded."""
        run_dir = self.workspace.run_dir(name)
        status = self.workspace.run_state(name)["status"]
        if checkpoint is None and not base and status in ("starting", "running", "running?"):
            raise RequestError(409, f"run {name!r} is still training; chat with one of its checkpoints "
                                    "(?checkpoint=checkpoint-N)")
        key, signature = (name, checkpoint, base), self._signature(run_dir)
        entry = self._loaded.get(key)
        if entry is not None and entry[0] == signature:
            self._loaded.move_to_end(key)
            return entry[1]
        if entry is not None:
            self._evict(key)  # the run was resumed or trained again since: its model is not the run's any more
        task = self._loading.get(key)
        if task is None:
            if len(self._loading) >= self.max_loading:  # each load is a whole model in memory, and they queue
                raise RequestError(429, f"{len(self._loading)} models are loading for chat already (the UI loads at "
                                        f"most {self.max_loading} at once); try again when they are loaded")
            while self._loaded and len(self._loaded) + len(self._loading) >= self.capacity:
                self._evict(next(iter(self._loaded)))
            task = asyncio.ensure_future(self._load(key, signature, run_dir))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody may be waiting
            self._loading[key] = task
        # shielded: a client that leaves does not cancel a load that others (or its retry) wait for
        return await asyncio.shield(task)

    async def _load(self, key: tuple, signature: tuple, run_dir: Path):
        try:
            app = await run_in_threadpool(load_chat_app, self.workspace, key[0], run_dir, key[1], key[2])
            self._loaded[key] = (signature, app)
            while len(self._loaded) > self.capacity:
                self._evict(next(iter(self._loaded)))
            return app
        finally:
            self._loading.pop(key, None)


    def _evict(self, key: tuple) -> None:
        """Forget a loaded model and free its memory once its in-flight requests have ended."""
        _, app = self._loaded.pop(key)
        release = asyncio.ensure_future(release_engine(app.state.engine))
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)

    @property
    def loaded(self) -> list[tuple]:
        """The keys of the models loaded now, least recently used first."""
        return list(self._loaded)


async def release_engine(engine, poll_seconds: float = 0.5) -> None:
    """Close `engine` (its model and tokenizer go) when no request uses it; then return the memory."""
    while not engine.idle:
        await asyncio.sleep(poll_seconds)
    engine.close()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# from_pretrained is not thread-safe: transformers builds a model on the meta device through process-wide patches,
# so two loads in parallel threads can see each other's meta tensors ("Cannot copy out of meta tensor")
_LOAD_LOCK = threading.Lock()


def load_chat_app(workspace: Workspace, name: str, run_dir: Path, checkpoint: Optional[str], base: bool):
    """loraft.serve's app for a run's model, loaded as `loraft serve` loads it (in a worker thread)."""
    from loraft.generate import load_run
    from loraft.rundir import RunAccess, open_run
    from loraft.serve.app import ServeSettings, create_app
    from loraft.serve.engine import Engine

    run = open_run(run_dir, RunAccess(allow_unfinished=True, checkpoint=checkpoint))
    # the base (and a preference run's source run) as the workspace places them: inside it, or a hub id if allowed
    run = dataclasses.replace(run, config=workspace.confine_config(run.config))
    with _LOAD_LOCK:
        model, tokenizer, template, info = load_run(run, dtype=run.config.generation.dtype, base_only=base)
    model_id = f"{name}/base" if base else f"{name}/{checkpoint}" if checkpoint else name
    engine = Engine(model, tokenizer, template, model_id, info["config"].generation, info)
    # the UI checks the Host header and its token before a request gets here
    return create_app(engine, ServeSettings(allowed_hosts=("*",)))
