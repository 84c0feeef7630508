"""The model behind the server: one generation at a time behind a bounded FIFO queue, prompts tokenized off
the event loop, and generations that stop when their client leaves or their stop string appears."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Optional, Sequence, Union

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from loraft.config import GenerationConfig
from loraft.generate import Answer, encode_prompt, stream_answer
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


class StopWhenCancelled(StoppingCriteria):
    """Ends generation at the next token once `cancel` is set (the client left, or the server is stopping)."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class StopOnText(StoppingCriteria):
    """Ends generation once the decoded answer contains a stop string.

    transformers' StopStringCriteria matches token strings from the vocabulary, which for byte-level BPE
    (BLOOM, Qwen) are byte symbols, so it never matches Chinese text; this decodes instead. Only the last
    few tokens are decoded: each holds at least one byte, so a stop string that just appeared lies within
    its UTF-8 length in tokens, plus a margin for tokens that decode to nothing.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.stops = [s for s in stops if s]
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 8

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        hits = []
        for row in input_ids:
            tail = self.tokenizer.decode(row[start:], skip_special_tokens=True)
            hits.append(any(stop in tail for stop in self.stops))
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


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
    """A request's place in the queue, held from admission (before its prompt is tokenized) until it holds
    the model or gives up. Releasing twice is harmless, so every path that may end a request releases it."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self.held = True
        engine.waiting += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self._engine.waiting -= 1


class Engine:
    """The loaded run plus a FIFO lock: one generation at a time, in a worker thread, behind a queue of at
    most `max_queue` requests.

    The counters (`waiting`, and the lock) change on the event loop only; `active_generations` also from
    worker threads, under a lock.
    """

    def __init__(self, model, tokenizer, template: Template, model_id: str, defaults: GenerationConfig,
                 info: Optional[dict] = None, max_queue: int = 16, context_length: Optional[int] = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.model_id = model_id
        self.defaults = defaults
        self.info = info or {}
        self.max_queue = max_queue
        self.context_length = context_length or model_context_length(model, tokenizer) or FALLBACK_CONTEXT_LENGTH
        self.created = int(time.time())
        self.lock = asyncio.Lock()
        self._counter_lock = threading.Lock()
        self.active_generations = 0
        self.most_concurrent_generations = 0
        self.waiting = 0  # requests admitted and not yet generating: tokenizing, or queued on the lock
        self.cancelled_generations = 0
        self.mean_generation_seconds = 1.0  # running mean, for Retry-After
        # One thread tokenizes prompts in arrival order: a 1 MiB prompt takes a while, never on the event loop.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraft-tokenize")

    # --- admission ---------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing generating and nothing admitted: closing now cuts no request short."""
        return self.active_generations == 0 and self.waiting == 0

    def close(self) -> None:
        """Let go of the model and tokenizer (a UI evicting it from its cache). Routes built by create_app keep a
        reference to this Engine for the process's life (FastAPI caches route functions), so the weights are only
        freed if the Engine itself drops them."""
        self.model = self.tokenizer = None
        self._tokenizer_thread.shutdown(wait=False)

    def reserve(self) -> QueuePlace:
        """A place in the queue.

        Raises:
            QueueFull: when `max_queue` requests wait already (with the seconds after which to retry).
        """
        if self.waiting >= self.max_queue:
            # a place frees up when the running generation ends: about one generation from now
            raise QueueFull(self.waiting, self.max_queue, max(1, math.ceil(self.mean_generation_seconds)))
        return QueuePlace(self)

    def prompt_token_ids(self, messages: Sequence[dict], template: Template) -> list[int]:
        return encode_prompt(self.tokenizer, template, messages)

    async def tokenize_prompt(self, messages: Sequence[dict], template: Template) -> list[int]:
        """The prompt's token ids, tokenized once, in the tokenizer thread (the event loop stays free): the
        context check counts them and the generation starts from them."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, self.prompt_token_ids, messages, template)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    # --- generation (worker thread) ----------------------------------------------------------------------

    def _enter(self) -> None:
        with self._counter_lock:
            self.active_generations += 1
            self.most_concurrent_generations = max(self.most_concurrent_generations, self.active_generations)

    def _leave(self, seconds: float, cancelled: bool) -> None:
        with self._counter_lock:
            self.active_generations -= 1
            self.cancelled_generations += cancelled
            self.mean_generation_seconds = 0.8 * self.mean_generation_seconds + 0.2 * seconds

    def generate_blocking(self, prompt_ids: Sequence[int], template: Template, settings: GenerationConfig,
                          seed: Optional[int], stops: Sequence[str], cancel: threading.Event,
                          on_piece: Optional[Callable[[str], None]] = None) -> Answer:
        """The answer, generated here and now; each decoded piece also goes to `on_piece`. Generation ends at
        an end token, max_new_tokens, the first stop string, or once `cancel` is set."""
        self._enter()
        started = time.monotonic()
        try:
            if seed is not None:
                torch.manual_seed(seed)
            criteria = [StopWhenCancelled(cancel)]
            if any(stops):
                criteria.append(StopOnText(self.tokenizer, stops, len(prompt_ids)))
            answer = stream_answer(self.model, self.tokenizer, template, (), settings, prompt_ids=prompt_ids,
                                   stopping_criteria=StoppingCriteriaList(criteria))
            pieces = []
            for piece in answer:
                pieces.append(piece)
                if on_piece is not None:
                    on_piece(piece)
            return Answer("".join(pieces), answer.tokens, answer.ended)
        finally:
            self._leave(time.monotonic() - started, cancel.is_set())

    # --- generation (event loop) -------------------------------------------------------------------------

    async def _wait_turn(self, place: QueuePlace) -> None:
        """Acquire the model lock; the queue place is given up then (or when the wait is cancelled)."""
        try:
            await self.lock.acquire()
        finally:
            place.release()

    def _start(self, work: Callable[[], Answer]) -> asyncio.Future:
        """Run `work` in a worker thread; the lock (held by the caller) is released when it ends, not when
        its caller goes away, so the next generation never overlaps this one."""
        try:
            future = asyncio.get_running_loop().run_in_executor(None, work)
        except BaseException:
            self.lock.release()
            raise
        future.add_done_callback(lambda _: self.lock.release())
        return future

    async def complete(self, prompt_ids, template: Template, settings: GenerationConfig, seed: Optional[int],
                       stops: Sequence[str], place: QueuePlace, cancel: threading.Event) -> Answer:
        """The whole answer; waits its turn. Cancelling this stops the generation at its next token."""
        await self._wait_turn(place)
        future = self._start(functools.partial(self.generate_blocking, prompt_ids, template, settings, seed, stops,
                                               cancel))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def stream(self, prompt_ids, template: Template, settings: GenerationConfig, seed: Optional[int],
                     stops: Sequence[str], place: QueuePlace,
                     cancel: threading.Event) -> AsyncIterator[Union[str, Answer]]:
        """The answer piece by piece, then its Answer (text empty; token count and end). Closing the iterator
        early stops the generation at its next token."""
        await self._wait_turn(place)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed (server stopped); nobody is listening any more
                pass

        def produce() -> Answer:
            try:
                answer = self.generate_blocking(prompt_ids, template, settings, seed, stops, cancel,
                                                on_piece=lambda piece: put(("piece", piece)))
                put(("done", Answer("", answer.tokens, answer.ended)))
                return answer
            except BaseException as exc:  # handed to the consumer below
                put(("error", exc))
                raise

        self._start(produce)
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

