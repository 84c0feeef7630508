"""One request's generation inside a batch (loraft.serve.batcher): its prompt, adapter, settings and random
generator, the tokens it has, how its text reaches its client, and how its next token is chosen from its own
logits, as transformers' `generate` chooses it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional, Sequence

import torch

from loraft.config import GenerationConfig
from loraft.generate import Answer

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


class Job:
    """One request's generation: what to generate from, how, and where its pieces and answer go.

    `on_start` is called (worker thread) when the job enters the batch, `on_piece` with each new piece of text;
    `future` resolves to its Answer (text whole, cut at nothing: the caller cuts at stop strings).
    """

    def __init__(self, prompt_ids: Sequence[int], adapter: Optional[str], tokenizer, stop_ids: Sequence[int],
                 settings: GenerationConfig, seed: Optional[int] = None, stops: Sequence[str] = (),
                 cancel: Optional[threading.Event] = None, on_piece: Optional[Callable[[str], None]] = None,
                 on_start: Optional[Callable[[], None]] = None):
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter or BASE_ADAPTER
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.settings, self.seed = settings, seed
        self.stops = [s for s in stops if s]
        self.cancel = cancel or threading.Event()
        self.on_piece, self.on_start = on_piece, on_start
        self.future: Future = Future()
        self.generated: list[int] = []
        self.ended = False  # an end token came
        self.printed = 0  # characters of the decoded answer handed to on_piece
        self.searched = 0  # characters of the decoded answer searched for stop strings
        self.text = ""
        self.started_at = 0.0
        self.generator: Optional[torch.Generator] = None

    @property
    def greedy(self) -> bool:
        return self.settings.temperature <= 0

    def start(self, device) -> None:
        self.started_at = time.monotonic()
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed if self.seed is not None
                                       else int(torch.randint(0, 2**62, (1,)).item()))
        if self.on_start is not None:
            self.on_start()

    def take(self, token: int) -> bool:
        """Add the chosen token; True when the answer is finished."""
        if token in self.stop_ids:
            self.ended = True  # finish() hands over the rest of the text
            return True
        self.generated.append(token)
        # decoded every step only for a stream's pieces or a stop string; a whole answer is decoded once, at the end
        stopped = self._emit(final=False) if self.on_piece is not None or self.stops else False
        return stopped or len(self.generated) >= self.settings.max_new_tokens or self.cancel.is_set()

    def _emit(self, final: bool) -> bool:
        """Hand the new whole characters to on_piece (held back while a multi-byte character is incomplete);
        True when a stop string has appeared."""
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        self.text = text
        if text.endswith("\ufffd") and not final:
            return False
        if len(text) > self.printed:
            piece, self.printed = text[self.printed:], len(text)
            if self.on_piece is not None:
                self.on_piece(piece)
        if not self.stops:
            return False
        # a stop string that just appeared ends in the new text: search from its longest length before it
        start = max(0, self.searched - max(len(stop) for stop in self.stops))
        self.searched = len(text)
        return any(stop in text[start:] for stop in self.stops)

    def finish(self) -> None:
        self._emit(final=True)
        if not self.future.done():
            self.future.set_result(Answer(self.text, len(self.generated), self.ended, tuple(self.generated)))


def choose_token(logits: torch.Tensor, job: Job) -> int:
    """The next token of one row from its float32 logits, by its own settings (transformers' processors' order)."""
    settings = job.settings
    scores = logits.clone()
    if settings.repetition_penalty != 1.0:
        seen = torch.tensor(job.prompt_ids + job.generated, dtype=torch.long, device=scores.device)
        picked = scores.gather(0, seen)
        picked = torch.where(picked < 0, picked * settings.repetition_penalty, picked / settings.repetition_penalty)
        scores.scatter_(0, seen, picked)
    if len(job.generated) < settings.min_new_tokens and job.stop_ids:
        scores[torch.tensor(sorted(job.stop_ids), device=scores.device)] = -float("inf")
    if job.greedy:
        return int(torch.argmax(scores))
    scores = scores / settings.temperature
    if settings.top_k > 0:
        k = min(settings.top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k).values[-1], -float("inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - settings.top_p)
        remove[-1] = False  # keep at least one
        scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    probabilities = scores.softmax(dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=job.generator))
