"""Supervised fine-tuning, the reference recipe: conversations with the prompt masked (loraft.data), trained by
LoraftTrainer: transformers' Trainer with the run's guarantees (loraft.trainer.RunGuarantees) and three changes,
each measured (docs/benchmarks.md): a length-grouped sampler, the supervised-only fused loss (loraft.loss) and
forward/backward in token-bounded sub-batches (loraft.batching) or packed rows (loraft.packing). Each falls back to
Trainer's own behaviour where it does not apply; tests/test_trainer.py checks each on its own."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer

from loraft.config import RunConfig
from loraft.data import prepare_datasets as prepare  # noqa: F401  (the interface: prepare(config, tokenizer))
from loraft.trainer import RunGuarantees, build_training_arguments

logger = logging.getLogger("loraft")


def check(config: RunConfig) -> None:
    """SFT runs with any valid config."""


def arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool):
    return build_training_arguments(config, plan, run_dir, has_eval=has_eval)


def build_trainer(config: RunConfig, plan, args, model, info: dict, tokenizer, prepared, callbacks: list):
    from transformers import DataCollatorForSeq2Seq

    from loraft.retention_guard import RetentionGuard
    from loraft.templates import get_template

    guard = RetentionGuard.for_run(config, tokenizer, get_template(config.data.template, tokenizer),
                                   precision=f"{plan.precision}|{plan.weights}")
    if guard is not None:
        tokens = prepared.report.get("tokens", {}).get("total", 0) / max(1, prepared.report.get("samples_kept", 1))
        logger.info(guard.set_every(config.train.retention_every, tokens * config.train.per_device_train_batch_size
                                    * config.train.gradient_accumulation_steps))
    return LoraftTrainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                         processing_class=tokenizer,
                         data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
                         callbacks=callbacks, plan=plan, nonfinite_patience=config.train.nonfinite_patience,
                         guard=guard)


class LoraftTrainer(RunGuarantees, Trainer):
    """Trainer with the run's guarantees (RunGuarantees), length-grouped sampling and the supervised-only loss.

    The sampler and the loss are loraft's faster equivalents (loraft.batching, loraft.loss), measured in
    docs/benchmarks.md; each falls back to Trainer's own where it does not apply.
    """

    def __init__(self, *args, plan=None, guard=None, **kwargs):
        """Args:
            plan: the run's loraft.plan.Plan: its sampler, sub-batch size, fused loss and packing (None: Trainer's
                own behaviour for all four).
            guard: the run's loraft.retention_guard.RetentionGuard (None: the plain objective).
        """
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._guard_step = -1  # the optimizer step whose guard term is in the gradients
        self._guard_kl, self._guard_steps, self._guard_seconds = 0.0, 0, 0.0
        self.packing = bool(plan and plan.packing)
        self.length_grouped = bool(plan and plan.sampler == "length_grouped")
        self.fused_loss = bool(plan and plan.fused_loss)
        self.micro_batch_tokens = plan.micro_batch_tokens if plan else 0
        # supervised tokens trained on since the last log (all ranks: Trainer gathers the count), and since when
        self._supervised_tokens = 0
        self._supervised_counted_step = -1
        self._supervised_since: Optional[float] = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if num_items_in_batch is not None and self.state.global_step != self._supervised_counted_step:
            # one count per optimizer step: every accumulated micro-batch receives the whole step's count
            self._supervised_counted_step = self.state.global_step
            self._supervised_tokens += int(num_items_in_batch)
            if self._supervised_since is None:
                self._supervised_since = time.monotonic()
        if self.guard is not None and self.state.global_step != self._guard_step:
            self._retention_step(model)
        return self._training_step(model, inputs, num_items_in_batch)

    def _retention_step(self, model) -> None:
        """The retention guard's term, before the first micro-batch of each guarded step (every guard.every steps,
        at guard.every x its weight): its gradients join the step's (under DDP they are reduced with the step's last backward; every rank scores the same rows,
        so the average is the term itself)."""
        self._guard_step = step = self.state.global_step
        if not self.guard.guarded(step):
            return
        started, every = time.monotonic(), self.guard.every
        with self.accelerator.no_sync(model):
            kl = self.guard.kl(self.accelerator.unwrap_model(model), step // every, self.accelerator.autocast,
                               last_step=(self.state.max_steps - 1) // every)
            self.accelerator.backward(self.guard.weight * every * kl)
        self._guard_kl += float(kl.detach())
        self._guard_steps += 1
        self._guard_seconds += time.monotonic() - started

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Trainer's log, with the supervised tokens per second of this process's steps beside each training loss
        (num_input_tokens_seen counts the prompt tokens too; the supervised ones are what is learnt), measured over
        the steps since the previous log."""
        if "loss" in logs and self._supervised_since is not None:
            # over the steps since the previous log: the speed now, not an average since the start
            now = time.monotonic()
            elapsed = now - self._supervised_since
            if elapsed > 0:
                logs["supervised_tokens_per_second"] = round(self._supervised_tokens / elapsed, 3)
            self._supervised_tokens, self._supervised_since = 0, now
        if "loss" in logs and self._guard_steps:
            # the guard's mean KL over the steps since the previous log, and its time (all of it, since the start)
            logs["retention_kl"] = round(self._guard_kl / self._guard_steps, 6)
            logs["retention_seconds"] = round(self._guard_seconds, 3)
            self._guard_kl, self._guard_steps = 0.0, 0
        super().log(logs, *args, **kwargs)

    def _training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward the step's batch in sub-batches of at most micro_batch_tokens padded tokens.

        Each sub-batch's loss is its supervised-token sum over the whole step's count, so the gradients add
        up to the unsplit batch's. Without that count (a model that takes no loss kwargs) it runs unsplit.
        Under DDP only the last sub-batch's backward synchronises gradients: ranks may split their batches
        into different numbers of sub-batches, and each must join exactly one all-reduce per step.
        """
        mask = inputs.get("attention_mask")
        if self.packing and num_items_in_batch is not None and mask is not None and mask.dim() == 2 and "labels" in inputs:
            return self._packed_training_step(model, inputs, num_items_in_batch)
        if (not self.micro_batch_tokens or num_items_in_batch is None or mask is None or mask.dim() != 2
                or mask.shape[0] * mask.shape[1] <= self.micro_batch_tokens):
            return super().training_step(model, inputs, num_items_in_batch)
        from loraft.batching import split_by_tokens

        rows, width = mask.shape
        total = None
        groups = split_by_tokens(mask.sum(dim=1).tolist(), self.micro_batch_tokens)
        for number, group in enumerate(groups):
            index = torch.tensor(group)
            columns = mask[index].any(dim=0).nonzero().flatten()  # right or left padding alike
            start, end = int(columns[0]), int(columns[-1]) + 1

            def rows_of(value):
                if not torch.is_tensor(value) or value.shape[:1] != (rows,):
                    return value
                value = value[index]
                return value[:, start:end] if value.dim() >= 2 and value.shape[1] == width else value

            sub_batch = {key: rows_of(value) for key, value in inputs.items()}
            last = number == len(groups) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, sub_batch, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def _packed_training_step(self, model, inputs, num_items_in_batch):
        """Forward/backward the step's samples packed into rows of at most micro_batch_tokens tokens (loraft.packing):
        no padding, no attention across samples, and each row's loss over the whole step's supervised count."""
        from loraft.fastpaths import packed_segments
        from loraft.packing import pack_batch

        budget = self.micro_batch_tokens or int(inputs["attention_mask"].sum())
        rows = pack_batch(inputs, budget)
        unwrapped = self.accelerator.unwrap_model(model)
        total = None
        for number, row in enumerate(rows):
            last = number == len(rows) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model), \
                    packed_segments(unwrapped, row["position_ids"]):
                loss = super().training_step(model, row, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    # no public hook takes a sampler: get_train_dataloader would have to be copied whole to pass one
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.length_grouped or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        from loraft.batching import LengthGroupedSampler, sample_lengths

        # the columns Trainer removed may include `length`; the original dataset still has it
        source = self.train_dataset if len(self.train_dataset) == len(dataset) else dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(sample_lengths(source), self.args.per_device_train_batch_size, seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The plan's fused loss (loraft.loss) while training, where the model's logits are lm_head(last hidden
        state); Trainer's own otherwise (evaluation, label smoothing, a custom loss)."""
        if not (self.fused_loss and model.training and not return_outputs and "labels" in inputs
                and self.label_smoother is None and self.compute_loss_func is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from loraft.loss import supervised_cross_entropy

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        body, head = base.base_model, base.get_output_embeddings()
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop("use_cache", None)  # a packed row says so; the body is called without a cache anyway
        # accelerate applies autocast by wrapping the model's forward, which calling the body skips
        with self.accelerator.autocast():
            hidden = body(**inputs, use_cache=False).last_hidden_state
            # the same normalisation as the model's own loss: over the optimizer step when Trainer counted it
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            return supervised_cross_entropy(hidden, labels, head.weight, count)
