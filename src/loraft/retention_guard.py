"""The retention guard: each SFT optimizer step also pulls the run towards its base on general chat.

A narrow fine-tune of a chat model wipes what it knew: every reply comes out in the task's form (docs/benchmarks.md,
"Retention"). The guard adds, once per optimizer step, `train.retention_weight` x the mean per-token KL divergence
from the base's next-token distribution to the run's, over the replies of `train.retention_rows` general
conversations the project ships (loraft/retention_guard.jsonl, disjoint from the prompts `loraft eval` measures
retention on), rendered in the run's template. The base is the same model with the adapter switched off (as DPO's
reference: no second copy of the weights). Its distribution on the shipped texts never changes, so its top-TOP_K
next-token log-probabilities on a text are computed once per base, template and precision (one forward, for the texts
a run will score, at its first guarded step) and cached; each step then costs one forward/backward on its rows, and
no generation.

Every `train.retention_every` optimizer steps (auto: sized from the data, so the guard's tokens stay within about
TOKEN_SHARE of the task's), with its weight times that many steps: the same pull on average, at a fraction of the cost
where the task's samples are short. The rows of the Nth guarded step are a fixed, seeded rotation through the texts: a
resumed run sees the same rows at the same step.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from loraft.encode import BatchEncoder, encode_rendered, right_pad_scored

logger = logging.getLogger("loraft")
GUARD_MAX_TOKENS = 192  # a guard text longer than this (rendered) is cut: its reply is short
TOP_K = 64  # the base's most likely next tokens kept per position (the rest is one bucket)
TOKEN_SHARE = 0.10  # train.retention_every auto: the guard's tokens at most this share of the task's (on average)
MAX_EVERY = 4  # ... but a guarded step at least every MAX_EVERY steps: a sparser guard pulls hard on the steps it runs


def encode_guard_texts(tokenizer, template, max_length: int) -> list[tuple[list[int], int]]:
    """The guard's conversations in the run's template: [(input_ids, first_scored)], where positions
    first_scored .. len-2 predict the reply's tokens (the reply's end token included)."""
    from loraft.retention_check import load_guard_texts

    rendered = [template.render([{"role": "user", "content": text["prompt"]},
                                 {"role": "assistant", "content": text["response"]}], tokenizer.eos_token)
                for text in load_guard_texts()]
    rows = []
    limit = min(max_length, GUARD_MAX_TOKENS)
    for input_ids, labels in encode_rendered(rendered, BatchEncoder(tokenizer)):
        supervised = [i for i, label in enumerate(labels) if label != -100]
        if not supervised or supervised[0] < 1 or supervised[0] >= limit:
            continue
        end = min(len(input_ids), limit, supervised[-1] + 1)
        rows.append((input_ids[:end], supervised[0] - 1))
    return rows


class RetentionGuard:
    """The KL term of one run: its encoded texts, the base's targets on them, its weight and rows per step."""

    def __init__(self, rows: Sequence[tuple[list[int], int]], weight: float, rows_per_step: int, pad_id: int,
                 seed: int, cache: Optional[Path] = None):
        """Args:
            rows: encode_guard_texts' rows.
            cache: where the base's targets are kept (None: computed in memory only).
        """
        if not rows:
            raise ValueError("the retention guard has no text that fits the template and max_length")
        self.rows, self.weight, self.rows_per_step, self.pad_id = list(rows), weight, rows_per_step, pad_id
        self.order = list(range(len(self.rows)))
        random.Random(f"retention-{seed}").shuffle(self.order)
        self.cache = cache
        self.every = 1  # optimizer steps per guarded step (set_every)
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> the base's top-k ids, log-probs

    @classmethod
    def for_run(cls, config, tokenizer, template, precision: str) -> Optional["RetentionGuard"]:
        """The run's guard, or None when train.retention resolves to off (loraft.retention_guard.resolved).

        Args:
            precision: how the run computes (the plan's precision and weights): part of the targets' cache key.
        """
        if resolved(config) != "kl":
            return None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = encode_guard_texts(tokenizer, template, config.data.max_length)
        return cls(rows, config.train.retention_weight, config.train.retention_rows, pad, config.train.seed,
                   cache=_targets_file(config, template, rows, precision))

    @property
    def tokens_per_step(self) -> float:
        """The mean tokens one guarded step scores (its rows' mean length x rows)."""
        return sum(len(ids) for ids, _ in self.rows) / len(self.rows) * min(self.rows_per_step, len(self.rows))

    def set_every(self, setting, task_tokens_per_step: float) -> str:
        """Resolve train.retention_every (auto: the fewest optimizer steps between guarded ones that keep the guard's
        tokens within TOKEN_SHARE of the task's) and return train.log's line about it."""
        ratio = self.tokens_per_step / max(task_tokens_per_step, 1.0)
        auto = min(MAX_EVERY, max(1, math.ceil(ratio / TOKEN_SHARE - 1e-9)))
        self.every = auto if setting == "auto" else int(setting)
        return (f"retention guard: every {self.every} optimizer step(s), weight {self.weight:g} x {self.every} "
                f"({'auto' if setting == 'auto' else 'train.retention_every'}); its {self.tokens_per_step:.0f} tokens "
                f"a guarded step against about {task_tokens_per_step:.0f} task tokens a step: "
                f"{100 * ratio / self.every:.0f}% more tokens")

    def guarded(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) takes the guard's term."""
        return step % self.every == 0

    def _chosen(self, step: int) -> list[int]:
        count = min(self.rows_per_step, len(self.rows))
        return [self.order[(step * count + i) % len(self.rows)] for i in range(count)]

    def batch(self, step: int, device) -> dict:
        """Step `step`'s rows, right-padded: input_ids, attention_mask, `scored` (positions whose next token is a
        reply token) and `rows` (their indexes in self.rows)."""
        return self._pad(self._chosen(step), device)

    def _pad(self, indexes: Sequence[int], device) -> dict:
        input_ids, mask, scored = right_pad_scored([self.rows[i] for i in indexes], self.pad_id)
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "scored": scored.to(device),
                "rows": list(indexes)}

    @staticmethod
    def _log_probs(model, batch: dict) -> torch.Tensor:
        """log-softmax of the model's next-token logits at the batch's scored positions (fp32), rows in order."""
        base = model.get_base_model()
        body, head = base.base_model, base.get_output_embeddings()
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
        return torch.log_softmax(head(hidden[batch["scored"]]).float(), dim=-1)

    def rows_of_steps(self, steps: Sequence[int]) -> list[int]:
        """The rows steps `steps` score, each once, in order of first use."""
        return list(dict.fromkeys(i for step in steps for i in self._chosen(step)))

    def _read_cache(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            saved = load(self.cache.read_bytes())  # read, not mapped: a cache file changed later cannot pull the rug
            counts = saved["counts"].tolist()
            pairs = zip(saved["ids"].split(counts), saved["values"].split(counts))
            self.targets.update((int(row), pair) for row, pair in zip(saved["rows"].tolist(), pairs)
                                if 0 <= int(row) < len(self.rows))
        except (OSError, KeyError, SafetensorError, RuntimeError) as exc:
            logger.warning("retention guard: %s unreadable (%s); computing the base's targets again", self.cache, exc)

    def _write_cache(self) -> None:
        from safetensors.torch import save_file

        rows = sorted(self.targets)
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            partial = self.cache.with_name(f".{self.cache.name}.{os.getpid()}.partial")
            save_file({"rows": torch.tensor(rows), "counts": torch.tensor([len(self.targets[r][0]) for r in rows]),
                       "ids": torch.cat([self.targets[r][0] for r in rows]),
                       "values": torch.cat([self.targets[r][1] for r in rows])}, str(partial))
            os.replace(partial, self.cache)
        except OSError as exc:
            logger.warning("retention guard: could not cache the base's targets in %s (%s)", self.cache, exc)

    @torch.no_grad()
    def prepare(self, model, autocast, steps: Optional[Sequence[int]] = None) -> float:
        """The base's top-TOP_K next-token log-probabilities at every scored position of the rows steps `steps`
        score (None: every row), the adapter switched off: read from the cache, the missing ones computed and added
        to it. Each step's rows are computed together, padded as the step pads them, so the base's side has the
        shapes (and so the low-precision rounding) of the run's side at that step. Returns the seconds it took."""
        started = time.monotonic()
        steps = range(-(-len(self.rows) // max(1, self.rows_per_step))) if steps is None else steps
        if self.cache is not None and self.cache.is_file() and not self.targets:
            self._read_cache()
        missing = [step for step in steps if any(i not in self.targets for i in self._chosen(step))]
        if not missing:
            logger.info("retention guard: the base's next-token targets on %d general conversations read from %s",
                        len(self.rows_of_steps(steps)), self.cache)
            return time.monotonic() - started
        device = next(model.parameters()).device
        training = model.training
        model.eval()  # the base's own distribution: no dropout
        computed = 0
        with autocast(), model.disable_adapter():
            for step in missing:
                if all(i in self.targets for i in self._chosen(step)):
                    continue  # an earlier step in this loop scored the same rows
                batch = self.batch(step, device)
                values, ids = self._log_probs(model, batch).topk(TOP_K, dim=-1)
                counts = batch["scored"].sum(dim=1).tolist()
                for row, row_ids, row_values in zip(batch["rows"], ids.split(counts), values.split(counts)):
                    self.targets.setdefault(row, (row_ids.to(torch.int32).cpu(), row_values.cpu()))
                computed += len(batch["rows"])
        model.train(training)
        if self.cache is not None:
            self._write_cache()
        seconds = time.monotonic() - started
        logger.info("retention guard: the base's next-token targets on %d general conversations in %.1f s (cached: "
                    "%s)", computed, seconds, self.cache)
        return seconds

    def kl(self, model, step: int, autocast, last_step: Optional[int] = None) -> torch.Tensor:
        """Mean KL(base || run) per reply token on step `step`'s rows, with gradients for the run's side.

        The base's distribution is its top-TOP_K tokens and one bucket for the rest (the KL between those coarsened
        distributions: never more than the full KL, equal to it where the top-k hold all the mass).

        Args:
            model: the PeftModel being trained (unwrapped); the base is its adapter switched off.
            autocast: the trainer's autocast context factory (accelerator.autocast).
            last_step: the run's last step: the base's targets missing for this step are computed for every step up
                to it at once (None: this step's only).
        """
        if any(i not in self.targets for i in self._chosen(step)):
            self.prepare(model, autocast, range(step, max(step, last_step if last_step is not None else step) + 1))
        batch = self.batch(step, next(model.parameters()).device)
        with autocast():
            current = self._log_probs(model, batch)
        ids = torch.cat([self.targets[i][0] for i in batch["rows"]]).to(current.device, torch.long)
        base = torch.cat([self.targets[i][1] for i in batch["rows"]]).to(current.device, torch.float32)
        run = current.gather(-1, ids)
        base_top, run_top = base.exp(), run.exp()
        base_rest = (1 - base_top.sum(-1)).clamp_min(1e-6)
        run_rest = (1 - run_top.sum(-1)).clamp_min(1e-6)
        kl = (base_top * (base - run)).sum(-1) + base_rest * (base_rest.log() - run_rest.log())
        return kl.mean()


def _targets_file(config, template, rows, precision: str) -> Path:
    """Where a base's targets are cached: by the base's files (or hub id and revision), the template, the encoded
    rows and the precision."""
    import hashlib
    import json

    from loraft.files import cache_dir, model_fingerprint

    parts = {"model": model_fingerprint(config.model.name_or_path, config.model.revision), "precision": precision,
             "template": hashlib.sha256(template.jinja.encode()).hexdigest(), "top_k": TOP_K, "version": 2,
             "rows": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
             "quantization": config.model.quantization}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir("retention") / f"guard-{key}.safetensors"


def resolved(config) -> str:
    """train.retention as a run applies it: auto is the KL guard for SFT, off for preference objectives (DPO and KTO
    keep their own reference; ORPO's odds ratio stays as TRL defines it)."""
    value = config.train.retention
    if value == "auto":
        lora_family = config.adapter.method not in ("prompt_tuning", "prefix_tuning")
        plain_base = config.model.quantization == "none"
        return "kl" if config.train.objective == "sft" and lora_family and plain_base else "off"
    return value


def describe(config) -> tuple[str, str]:
    """(the plan's value, its reason) for the guard."""
    if resolved(config) == "off":
        if config.train.retention == "off":
            why = "train.retention: off"
        elif config.train.objective != "sft":
            why = f"train.objective={config.train.objective} keeps its own reference"
        elif config.model.quantization != "none":
            why = f"model.quantization={config.model.quantization}: the guard does not run on a quantized base yet"
        else:
            why = f"adapter.method={config.adapter.method}: no adapter to switch off inside the model"
        return "off", why
    every = config.train.retention_every
    value = (f"KL to the base, weight {config.train.retention_weight:g}, {config.train.retention_rows} shipped "
             "general conversation(s) " + ("every few steps (auto)" if every == "auto" else f"every {every} step(s)"))
    reason = ("one forward/backward on those rows per guarded step, against the base's next-token targets computed "
              "once per base and template (one forward over the rows the run scores, cached); "
              + (f"auto: as often as keeps its tokens within {TOKEN_SHARE:.0%} of the task's, at least every "
                 f"{MAX_EVERY} steps (train.log says how often); " if every == "auto" else "")
              + "its time is logged as retention_seconds; train.retention=off turns it off")
    return value, reason
