"""The model behind the server: the names it is served under (one base, any number of adapters on it), a
bounded FIFO queue in front of the batcher (loraft.serve.batcher), prompts tokenized off the event loop, and
generations that stop when their client leaves or their stop string appears."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence, Union

from loraft.config import GenerationConfig
from loraft.generate import Answer, encode_prompt, stop_token_ids
from loraft.templates import Template

# When neither the model's config nor its tokenizer states a context (BLOOM: ALiBi, no position table),
# prompts are still bounded: attention memory grows with the square of the length.
FALLBACK_CONTEXT_LENGTH = 2048


def model_context_length(model, tokenizer) -> Optional[int]:
    """The most tokens (prompt + answer) the model takes: its config's max_position_embeddings, else the
    tokenizer's model_max_length; None when neither says."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        return positions
    limit = getattr(tokenizer, "model_max_length", None)
    # transformers fills in int(1e30) when the tokenizer's config gives no model_max_length
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    return None


class StopScanner:
    """Cut a streamed answer at the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if hits:
            self.stopped = True
            text, self.buffer = self.buffer[: min(hits)], ""
            return text
        keep = min(self.hold, len(self.buffer))
        text, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return text

    def flush(self) -> str:
        text, self.buffer = ("" if self.stopped else self.buffer), ""
        return text


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class QueueFull(Exception):
    """`max_queue` requests wait already; the server answers 429 with Retry-After (loraft.serve.app)."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        super().__init__(f"{waiting} requests are queued (limit {limit}); retry after {retry_after} s")
        self.waiting, self.limit, self.retry_after = waiting, limit, retry_after



class QueuePlace:
    """A request's place in the queue, held from admission (before its prompt is tokenized) until its generation
    starts or it gives up. Releasing twice is harmless, so every path that may end a request releases it."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self.held = True
        engine.waiting += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self._engine.waiting -= 1


@dataclass
class Served:
    """One model name the server answers to: an adapter on the shared base (or the base itself), with the
    tokenizer, template and generation defaults of its run."""

    name: str
    adapter: Optional[str]  # peft's adapter name in the shared model; None = the base without any adapter
    tokenizer: object
    template: Template
    defaults: GenerationConfig
    info: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # requests that chose this model and have not ended
    unloading: bool = False

    def stop_ids(self, template: Template) -> list[int]:
        return stop_token_ids(self.tokenizer, template)


class Engine:
    """The shared model, the names it is served under, and the batcher that decodes every request.

    A request takes a queue place (at most `max_queue` wait: QueueFull past that), is tokenized in the tokenizer
    thread, and waits until the batcher takes it into the running batch (at most `max_batch` rows decode together,
    mixing adapters). `waiting` changes on the event loop only; the generation counters also from the batcher's
    thread, under a lock.

    The first Served (from the constructor's arguments) is the primary one: `model_id`, `template`, `tokenizer`,
    `defaults` and `info` are its own.
    """

    def __init__(self, model, tokenizer, template: Template, model_id: str, defaults: GenerationConfig,
                 info: Optional[dict] = None, max_queue: int = 16, context_length: Optional[int] = None,
                 max_batch: int = 8, mix_adapters: bool = True, adapter: Union[str, None, bool] = True):
        from loraft.serve.batcher import Batcher

        self.model = model
        self.max_queue = max_queue
        self.context_length = context_length or model_context_length(model, tokenizer) or FALLBACK_CONTEXT_LENGTH
        if adapter is True:  # the model's active adapter, if it has one
            adapter = model.active_adapter if hasattr(model, "peft_config") else None
        self.models: dict[str, Served] = {}
        self.add(Served(model_id, adapter, tokenizer, template, defaults, info or {}))
        self.primary = self.models[model_id]
        self.created = self.primary.created
        self._counter_lock = threading.Lock()
        self.active_generations = 0
        self.most_concurrent_generations = 0
        self.waiting = 0  # requests admitted and not yet generating: tokenizing, or queued for the batch
        self.cancelled_generations = 0
        self.mean_generation_seconds = 1.0  # running mean, for Retry-After
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
        self.batcher = Batcher(model, max_batch=max_batch, mix_adapters=mix_adapters, pad_token_id=pad)
        # One thread tokenizes prompts in arrival order: a 1 MiB prompt takes a while, never on the event loop.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraft-tokenize")

    # --- the primary model's attributes ----------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.primary.name

    @property
    def tokenizer(self):
        return self.primary.tokenizer

    @property
    def template(self) -> Template:
        return self.primary.template

    @property
    def defaults(self) -> GenerationConfig:
        return self.primary.defaults

    @property
    def info(self) -> dict:
        return self.primary.info

    # --- the served names ------------------------------------------------------------------------------------

    def add(self, served: Served) -> None:
        self.models[served.name] = served

    def lookup(self, name: str) -> Optional[Served]:
        """The model served under `name` (None when there is none, or it is being unloaded)."""
        served = self.models.get(name)
        return None if served is None or served.unloading else served

    @property
    def names(self) -> list[str]:
        return [name for name, served in self.models.items() if not served.unloading]

    def hold(self, served: Served) -> "Use":
        """Count a request on `served` until the returned Use is released (an unload waits for it)."""
        with self._counter_lock:
            served.in_flight += 1
        return Use(self, served)

    def _let_go(self, served: Served) -> None:
        with self._counter_lock:
            served.in_flight -= 1

    # --- admission ---------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing generating and nothing admitted: closing now cuts no request short."""
        return self.active_generations == 0 and self.waiting == 0

    def close(self) -> None:
        """Let go of the model and tokenizer (a UI evicting it from its cache). Routes built by create_app keep a
        reference to this Engine for the process's life (FastAPI caches route functions), so the weights are only
        freed if the Engine itself drops them."""
        self.batcher.close()
        self.batcher.thread.join(timeout=30)
        self.batcher.model = self.batcher.mixed = self.model = None
        for served in self.models.values():
            served.tokenizer = None
        self._tokenizer_thread.shutdown(wait=False)

    def reserve(self) -> QueuePlace:
        """A place in the queue.

        Raises:
            QueueFull: when `max_queue` requests wait already (with the seconds after which to retry).
        """
        if self.waiting >= self.max_queue:
            # a place frees up when a running generation ends: about one generation from now
            raise QueueFull(self.waiting, self.max_queue, max(1, math.ceil(self.mean_generation_seconds)))
        return QueuePlace(self)

    def prompt_token_ids(self, messages: Sequence[dict], template: Template, tokenizer=None) -> list[int]:
        return encode_prompt(tokenizer or self.tokenizer, template, messages)

    async def tokenize_prompt(self, messages: Sequence[dict], template: Template, tokenizer=None) -> list[int]:
        """The prompt's token ids, tokenized once, in the tokenizer thread (the event loop stays free): the
        context check counts them and the generation starts from them."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, self.prompt_token_ids, messages, template, tokenizer)

    @contextlib.contextmanager
    def paused(self):
        """Hold admissions to the batch while inside (requests queue up); tests use it to build a queue."""
        self.batcher.set_paused(True)
        try:
            yield
        finally:
            self.batcher.set_paused(False)

    # --- generation --------------------------------------------------------------------------------------

    def _started(self) -> None:  # the batcher's thread
        with self._counter_lock:
            self.active_generations += 1
            self.most_concurrent_generations = max(self.most_concurrent_generations, self.active_generations)

    def answered(self, answer: Answer, seconds: float, cancelled: bool) -> None:
        """A generation ended (the batcher's thread)."""
        with self._counter_lock:
            self.active_generations -= 1
            self.cancelled_generations += cancelled
            self.mean_generation_seconds = 0.8 * self.mean_generation_seconds + 0.2 * seconds

    def _job(self, served: Optional[Served], prompt_ids, template: Template, settings: GenerationConfig,
             seed: Optional[int], stops: Sequence[str], place: QueuePlace, cancel: threading.Event,
             on_piece=None):
        from loraft.serve.batcher import Job

        served = served or self.primary
        loop = asyncio.get_running_loop()

        def on_start() -> None:
            self._started()
            try:
                loop.call_soon_threadsafe(place.release)
            except RuntimeError:  # the loop closed (server stopped)
                pass

        job = Job(prompt_ids, served.adapter, served.tokenizer, served.stop_ids(template), settings, seed, stops,
                  cancel, on_piece=on_piece, on_start=on_start)

        def ended(future) -> None:
            if job.started_at and not future.cancelled() and future.exception() is None:
                self.answered(future.result(), time.monotonic() - job.started_at, cancel.is_set())
            elif job.started_at:
                with self._counter_lock:
                    self.active_generations -= 1

        job.future.add_done_callback(ended)
        return job

    async def complete(self, prompt_ids, template: Template, settings: GenerationConfig, seed: Optional[int],
                       stops: Sequence[str], place: QueuePlace, cancel: threading.Event,
                       served: Optional[Served] = None) -> Answer:
        """The whole answer; waits its turn. Cancelling this stops the generation at its next token."""
        job = self._job(served, prompt_ids, template, settings, seed, stops, place, cancel)
        try:
            return await asyncio.shield(asyncio.wrap_future(self.batcher.submit(job)))
        except asyncio.CancelledError:
            cancel.set()
            place.release()
            raise

    async def stream(self, prompt_ids, template: Template, settings: GenerationConfig, seed: Optional[int],
                     stops: Sequence[str], place: QueuePlace, cancel: threading.Event,
                     served: Optional[Served] = None) -> AsyncIterator[Union[str, Answer]]:
        """The answer piece by piece, then its Answer (text empty; token count and end). Closing the iterator
        early stops the generation at its next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed (server stopped); nobody is listening any more
                pass

        job = self._job(served, prompt_ids, template, settings, seed, stops, place, cancel,
                        on_piece=lambda piece: put(("piece", piece)))

        def ended(future) -> None:
            if future.cancelled() or future.exception() is not None:
                put(("error", future.exception() or RuntimeError("cancelled")))
            else:
                answer = future.result()
                put(("done", Answer("", answer.tokens, answer.ended)))

        job.future.add_done_callback(ended)
        self.batcher.submit(job)
        finished = False
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    finished = True
                    raise value
                if kind == "done":
                    finished = True
                    yield value
                    return
                if value:
                    yield value
        finally:
            if not finished:
                cancel.set()


class Use:
    """A request's hold on the model it chose (Engine.hold); releasing twice is harmless."""

    def __init__(self, engine: Engine, served: Served):
        self._engine, self.served, self.held = engine, served, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._engine._let_go(self.served)
