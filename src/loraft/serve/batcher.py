"""Batched decoding for the server: the requests of every adapter served on one base decoded together.

Each request is a `Job` with its own adapter (peft's `adapter_names`, so one forward mixes adapters), sampling
settings, seed, end tokens, stop strings and cancel flag. A worker thread owns the model. At each step it admits
waiting jobs (up to `max_batch` rows), prefills them together (left-padded) and splices their key/value cache into
the running batch's; then it takes one decode step for every row. A row leaves as soon as it ends (an end token,
its token budget, a stop string, its client gone), and its cache rows go with it, so a long answer never makes a
short one wait and finished rows cost nothing. Work that changes the model (loading or deleting an adapter) runs
on the same thread between steps (`call`).

Each row's next token is chosen from its own logits only, as transformers' `generate` chooses it (float32 logits;
repetition penalty, then min_new_tokens, then temperature, top_k, top_p; greedy takes the first maximum), with its
own random generator, so a seeded request gives the same answer whatever else shares its batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from loraft.serve.job import Job, choose_token
from loraft.serve.lora_rows import MixedAdapters

logger = logging.getLogger("loraft")


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


class Batch:
    """The rows being decoded: their jobs, attention mask, positions and key/value cache."""

    def __init__(self):
        self.jobs: list[Job] = []
        self.mask: Optional[torch.Tensor] = None  # [rows, length], 0 on left padding
        self.cache = None
        self.last: Optional[torch.Tensor] = None  # [rows] the token each row feeds next

    def __len__(self) -> int:
        return len(self.jobs)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (cache included), and drop the padding columns no kept row needs."""
        if len(rows) == len(self.jobs):
            return
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.jobs = [self.jobs[i] for i in rows]
        self.mask, self.last = self.mask[index], self.last[index]
        self.cache.batch_select_indices(index)
        unused = int((self.mask.cumsum(dim=1) == 0).all(dim=0).sum())  # leading columns of padding in every row
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def join(self, other: "Batch") -> None:
        """Append another batch's rows: the shorter cache is left-padded (masked) to the longer one's length."""
        if not other.jobs:  # every new row ended at its first token
            return
        if not self.jobs:
            self.jobs, self.mask, self.cache, self.last = other.jobs, other.mask, other.cache, other.last
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.jobs = self.jobs + other.jobs
        self.last = torch.cat([self.last, other.last])


def splicable(cache) -> bool:
    """Whether rows can be added to and removed from this cache: every layer a plain DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


class Batcher:
    """The worker thread that owns the model and decodes every job.

    Args:
        max_batch: most rows decoded together (1: one request at a time).
        mix_adapters: whether one batch may hold several adapters; False admits only jobs of the adapter the running
            batch has (the others wait until it empties): serving one adapter at a time, for comparison.
    """

    def __init__(self, model, max_batch: int = 8, mix_adapters: bool = True, pad_token_id: int = 0):
        self.model, self.max_batch, self.mix_adapters = model, max(1, max_batch), mix_adapters
        self.pad_token_id = pad_token_id
        self.peft = hasattr(model, "peft_config")
        # prompt and prefix tuning put virtual tokens into the model's inputs or cache: their rows go one at a time,
        # through peft's own generate
        self.alone = self.peft and any(config.is_prompt_learning for config in model.peft_config.values())
        if self.alone:
            self.max_batch = 1
        self.mixed = MixedAdapters(model)
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable, Future]] = deque()
        self.condition = threading.Condition()
        self.paused = False  # tests hold admissions to build a queue
        self.closed = False
        self.batch = Batch()
        self._admitting: list[Job] = []
        self.largest_batch = 0
        self.splice = True  # joins into a running batch; off once a model's cache turns out not to allow it
        self._logits_to_keep: Optional[bool] = None  # whether the model's forward takes it (asked on first use)
        self.thread = threading.Thread(target=self._run, name="loraft-batcher", daemon=True)
        self.thread.start()

    @property
    def device(self):
        return next(self.model.parameters()).device

    # --- called from other threads ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No row decoding and none waiting."""
        return not len(self.batch) and not self.waiting and not self._admitting

    def submit(self, job: Job) -> Future:
        with self.condition:
            if self.closed:
                raise RuntimeError("the server's model is closed")
            self.waiting.append(job)
            self.condition.notify()
        return job.future

    def call(self, work: Callable):
        """Run `work()` on the worker thread between steps (it may change the model); returns its Future."""
        future: Future = Future()
        with self.condition:
            self.calls.append((work, future))
            self.condition.notify()
        return future

    def set_paused(self, paused: bool) -> None:
        with self.condition:
            self.paused = paused
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()

    # --- the worker thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.closed and not self.calls and not len(self.batch) and (self.paused or not self.waiting):
                    self.condition.wait()
                if self.closed:
                    failed = list(self.waiting) + self.batch.jobs
                    self.waiting.clear()
                    break
                calls = list(self.calls)
                self.calls.clear()
            for work, future in calls:
                try:
                    future.set_result(work())
                except BaseException as exc:  # handed to whoever asked
                    future.set_exception(exc)
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failed forward fails the rows it held; the server goes on
                logger.exception("generation failed")
                for job in self.batch.jobs + self._admitting:
                    if not job.future.done():
                        job.future.set_exception(exc)
                self.batch = Batch()
        for job in failed:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server's model is closed"))

    def _admit(self) -> list[Job]:
        """Waiting jobs that enter the batch now, first come first served; cancelled ones are answered at once."""
        admitted: list[Job] = []
        with self.condition:
            if self.paused or (len(self.batch) and not self.splice):
                return admitted
            adapter = self.batch.jobs[0].adapter if len(self.batch) else None  # one-adapter batches: whose
            passed: list[Job] = []  # jobs of other adapters, left waiting in their order
            while self.waiting and len(self.batch) + len(admitted) < self.max_batch:
                job = self.waiting.popleft()
                if job.cancel.is_set():
                    job.finish()
                    continue
                if not self.mix_adapters:
                    adapter = adapter or job.adapter
                    if job.adapter != adapter:
                        passed.append(job)
                        continue
                admitted.append(job)
            self.waiting.extendleft(reversed(passed))
        return admitted

    def _forward(self, input_ids, mask, positions, cache, adapters: list[str]):
        if self._logits_to_keep is None:
            from loraft.model import takes_logits_to_keep

            self._logits_to_keep = takes_logits_to_keep(self.model)
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        mixed = self.peft and any(adapter != self.model.active_adapter for adapter in adapters)
        with self.mixed.rows(adapters) if mixed else contextlib.nullcontext():  # the active adapter alone: as peft
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, **kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _prefill(self, jobs: list[Job]) -> Batch:
        from transformers import DynamicCache

        width = max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.full((len(jobs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        logits, cache = self._forward(input_ids, mask, positions, cache, [job.adapter for job in jobs])
        if not splicable(cache):
            self.splice = False
        batch = Batch()
        batch.jobs, batch.mask, batch.cache = jobs, mask, cache
        batch.last = torch.tensor([choose_token(logits[row], job) for row, job in enumerate(jobs)],
                                  dtype=torch.long, device=self.device)
        self.first_logits(jobs, logits)
        return batch

    def first_logits(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Called with each prefill's last-position logits (float32); tests compare them."""

    def _generate_alone(self, job: Job) -> None:
        """One job through the model's own generate (prompt and prefix tuning), a step at a time as in a batch."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        settings = job.settings

        class EachToken(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([job.cancel.is_set() or job.take(int(input_ids[0, -1]))], device=input_ids.device)

        kwargs = {"max_new_tokens": settings.max_new_tokens, "eos_token_id": sorted(job.stop_ids),
                  "pad_token_id": self.pad_token_id, "repetition_penalty": settings.repetition_penalty,
                  "min_new_tokens": min(settings.min_new_tokens, settings.max_new_tokens) or None,
                  "do_sample": not job.greedy}
        if not job.greedy:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
            torch.manual_seed(job.seed if job.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        input_ids = torch.tensor([job.prompt_ids], device=self.device)
        self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            stopping_criteria=StoppingCriteriaList([EachToken()]), **kwargs)
        job.finish()

    def _step(self) -> None:
        self._admitting = self._admit()
        if self.alone:
            for job in self._admitting:
                job.start(self.device)
                self._generate_alone(job)
            self._admitting = []
            return
        if self._admitting:
            for job in self._admitting:
                job.start(self.device)
            fresh = self._prefill(self._admitting)
            self._admitting = []
            self._settle(fresh)
            self.batch.join(fresh)
            self.largest_batch = max(self.largest_batch, len(self.batch))
        if not len(self.batch):
            return
        batch = self.batch
        mask = torch.cat([batch.mask, torch.ones((len(batch), 1), dtype=batch.mask.dtype, device=self.device)], 1)
        positions = (mask.sum(dim=1, keepdim=True) - 1)
        logits, batch.cache = self._forward(batch.last[:, None], mask, positions, batch.cache,
                                            [job.adapter for job in batch.jobs])
        batch.mask = mask
        batch.last = torch.tensor([choose_token(logits[row], job) for row, job in enumerate(batch.jobs)],
                                  dtype=torch.long, device=self.device)
        self._settle(batch)

    def _settle(self, batch: Batch) -> None:
        """Give each row its chosen token; finished rows leave the batch."""
        keep, done = [], []
        for row, job in enumerate(batch.jobs):
            if job.cancel.is_set() or job.take(int(batch.last[row])):
                done.append(job)
            else:
                keep.append(row)
        batch.keep(keep)
        for job in done:  # answered once out of the batch: an idle batcher is idle when its last answer arrives
            job.finish()
