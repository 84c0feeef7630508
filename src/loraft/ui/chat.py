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


def chat_model_id(key: tuple) -> str:
    """The model id a chat model answers to: RUN, RUN/checkpoint-N, or RUN/base."""
    name, checkpoint, base = key
    return f"{name}/base" if base else f"{name}/{checkpoint}" if checkpoint else name


class BaseCopy:
    """One base model in memory (a loraft.serve Engine) and the chat models on it: runs' adapters, checkpoints'
    adapters and the base itself, each one Served of the engine."""

    def __init__(self, engine, shared):
        self.engine, self.shared = engine, shared
        self.keys: set[tuple] = set()
        self.hint = None  # the base_model its first run's record names (what a load's cap compares)


class ChatModels:
    """The chat apps of loaded models, keyed by (run, checkpoint or None, base). Runs on one base share one copy of
    it (loraft.serve's mixed batches: one Engine, an adapter per run), so a run, its checkpoints, its base and other
    runs of that base side by side cost one base in memory plus their adapters. At most `capacity` base copies stay
    loaded (the least recently used goes first, with its models), each with at most `per_base` chat models.
    A run whose adapter cannot share (prompt or prefix tuning, IA3, DoRA) gets a base copy of its own."""

    def __init__(self, workspace: Workspace, capacity: int = 2, max_loading: Optional[int] = None,
                 per_base: int = 16):
        self.workspace, self.capacity, self.per_base = workspace, capacity, per_base
        self.max_loading = capacity if max_loading is None else max_loading  # loads at once (429 past it)
        self._loaded: OrderedDict[tuple, tuple[tuple, object, object]] = OrderedDict()  # key -> (signature, app, base)
        self._bases: OrderedDict[object, BaseCopy] = OrderedDict()
        self._loading: dict[tuple, asyncio.Task] = {}
        self._loading_bases: dict[tuple, object] = {}  # key -> its run record's base_model, while it loads
        self._lock = asyncio.Lock()  # one load at a time: loads into one base copy must not interleave
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
            self._bases.move_to_end(entry[2])
            return entry[1]
        task = self._loading.get(key)
        if task is None:
            # a load of a base neither loaded nor loading is a whole model in memory: at most max_loading of those
            # at once; a run of a base that is (an adapter more) does not count
            hint = read_record(run_dir).get("base_model")
            bases = {copy.hint for copy in self._bases.values()} | set(self._loading_bases.values())
            if hint not in bases and len(set(self._loading_bases.values())) >= self.max_loading:
                raise RequestError(429, f"{len(self._loading)} models are loading for chat already (the UI loads at "
                                        f"most {self.max_loading} base models at once); try again when they are "
                                        "loaded")
            task = asyncio.ensure_future(self._load(key, signature, run_dir))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody may be waiting
            self._loading[key], self._loading_bases[key] = task, hint
        # shielded: a client that leaves does not cancel a load that others (or its retry) wait for
        return await asyncio.shield(task)

    async def _load(self, key: tuple, signature: tuple, run_dir: Path):
        from loraft.serve.adapters import base_key, mix_problem, put_in
        from loraft.serve.app import ServeSettings, create_app

        try:
            async with self._lock:
                if key in self._loaded:  # stale (the run was trained again since): its model goes first
                    await self._drop(key)
                name, checkpoint, base = key
                run = await run_in_threadpool(open_chat_run, self.workspace, run_dir, checkpoint)
                model_id = chat_model_id(key)
                shares = mix_problem(run.adapter_dir) is None
                where = base_key(run) if shares else key  # a run that cannot share keeps a copy of its own
                copy = self._bases.get(where)
                if copy is None or copy.engine.model is None:
                    while self._bases and len(self._bases) >= self.capacity:
                        self._evict_base(next(iter(self._bases)))
                    copy = await run_in_threadpool(load_base_copy, run, model_id, base, shares)
                    copy.hint = self._loading_bases.get(key)
                    self._bases[where] = copy
                elif model_id not in copy.engine.models:
                    adapter = None if base else copy.shared.adapter_name()
                    copy.shared.check(run, model_id, copy.engine.names)
                    served = await run_in_threadpool(copy.shared.served, run, model_id, adapter)
                    if adapter is None:
                        copy.engine.add(served)
                    else:
                        await put_in(copy.engine, run, served)
                while len(copy.keys) >= self.per_base:  # adapters are small, but not free
                    self._evict(next(k for k in self._loaded if k in copy.keys))
                app = create_app(copy.engine, ServeSettings(allowed_hosts=("*",)), only=model_id)
                app.state.engine = copy.engine
                copy.keys.add(key)
                self._loaded[key] = (signature, app, where)
                self._bases.move_to_end(where)
                return app
        finally:
            self._loading.pop(key, None)
            self._loading_bases.pop(key, None)

    def _evict(self, key: tuple) -> None:
        """Forget one chat model; its adapter's weights go once its in-flight requests have ended (the adapter the
        base copy was loaded with stays until the copy goes)."""
        from loraft.serve.adapters import take_out

        _, app, where = self._loaded.pop(key)
        copy = self._bases.get(where)
        if copy is None:
            return
        copy.keys.discard(key)
        served = copy.engine.models.get(chat_model_id(key))
        if not copy.keys:
            self._evict_base(where)
        elif served is not None and served is not copy.engine.primary:
            self._track(asyncio.ensure_future(take_out(copy.engine, served)))

    async def _drop(self, key: tuple) -> None:
        """Forget a stale chat model now: its adapter is taken out before the run's new one goes in; when it is the
        adapter its base copy was loaded with, the copy goes."""
        from loraft.serve.adapters import take_out

        where = self._loaded[key][2]
        copy = self._bases.get(where)
        served = copy.engine.models.get(chat_model_id(key)) if copy is not None else None
        if copy is None or served is None or served is copy.engine.primary or copy.shared is None:
            self._loaded.pop(key)
            if copy is not None:
                self._evict_base(where)
            return
        self._loaded.pop(key)
        copy.keys.discard(key)
        await take_out(copy.engine, served)

    def _evict_base(self, where) -> None:
        """Forget a base copy and every chat model on it; its memory is freed once its requests have ended."""
        copy = self._bases.pop(where)
        for key in [k for k in self._loaded if k in copy.keys]:
            self._loaded.pop(key)
        self._track(asyncio.ensure_future(release_engine(copy.engine)))

    def _track(self, task: asyncio.Task) -> None:
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    @property
    def loaded(self) -> list[tuple]:
        """The keys of the models loaded now, least recently used first."""
        return list(self._loaded)

    @property
    def base_copies(self) -> int:
        """How many base models are in memory for chat."""
        return len(self._bases)


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


def open_chat_run(workspace: Workspace, run_dir: Path, checkpoint: Optional[str]):
    """The run (or its checkpoint) opened for chat, with its base placed as the workspace places it: inside it, or a
    hub id if allowed."""
    from loraft.run_access import RunAccess, open_run

    run = open_run(run_dir, RunAccess(allow_unfinished=True, checkpoint=checkpoint))
    return dataclasses.replace(run, config=workspace.confine_config(run.config))


def load_base_copy(run, model_id: str, base: bool, shares: bool) -> BaseCopy:
    """A base copy for chat, loaded as `loraft serve` loads a run (in a worker thread): with the run's adapter, so
    other runs of the base can join it (`shares`), serving `model_id` (the adapter, or the base when `base`)."""
    from loraft.generate import load_run
    from loraft.serve.adapters import load_runs
    from loraft.serve.engine import Engine, Served

    with _LOAD_LOCK:
        if not shares and base:  # a prompt-tuning run's base: the base alone, as before
            model, tokenizer, template, info = load_run(run, dtype=run.config.generation.dtype, base_only=True)
            engine = Engine(model, tokenizer, template, model_id, info["config"].generation, info)
            return BaseCopy(engine, None)
        adapter_id = model_id.removesuffix("/base") if base else model_id
        engine, shared = load_runs([run], [adapter_id], device=None, dtype=run.config.generation.dtype,
                                   serve_base=False)
    if base:
        primary = engine.primary
        engine.add(Served(model_id, None, primary.tokenizer, primary.template, primary.defaults,
                          {**primary.info, "adapter_dir": None}))
    return BaseCopy(engine, shared)
