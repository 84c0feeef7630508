"""The Trainer loraft runs, its callbacks, and the mapping of `train.*` onto TrainingArguments.

`RunGuarantees` is what every trainer of a run has, whatever computes its loss: atomic checkpoints (written under
`.staging/`, then renamed) and a stop on a non-finite loss or gradient norm before the optimizer uses it. SFT's
`LoraftTrainer` is transformers' Trainer with those plus three changes, each measured: a length-grouped sampler,
the supervised-only fused loss (loraft.loss) and forward/backward in token-bounded sub-batches (loraft.batching).
Each falls back to Trainer's own behaviour where it does not apply; tests/test_trainer.py checks each override on
its own. The preference objectives mix RunGuarantees into TRL's trainers (loraft.preference_trainer).

The graceful stop is a callback, not an override: `StopRequest` turns SIGTERM/SIGINT into a request, `GracefulStop`
ends the current optimizer step, saves a checkpoint through the same atomic path and ends training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from loraft.config import RunConfig
from loraft.errors import RunError
from loraft.rundir import CHECKPOINTS, RunDir, read_metrics

logger = logging.getLogger("loraft")


class NonFiniteTraining(RunError):
    """Training met a NaN/inf loss or gradient norm more often in a row than train.nonfinite_patience allows."""


class RunGuarantees:
    """What every trainer of a loraft run has, whatever computes its loss (LoraftTrainer for SFT, TRL's preference
    trainers in loraft.preference_trainer): atomic checkpoints and the stop on a non-finite loss or gradient norm.

    Mixed in before a transformers Trainer subclass: `class T(RunGuarantees, SomeTrainer)`.
    Trainer writes checkpoint-N in place, so a crash mid-save leaves a half-written checkpoint that
    `resume_from_checkpoint` would pick. Writing under `.staging/` and renaming avoids that.
    """

    def __init__(self, *args, nonfinite_patience: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite_patience = nonfinite_patience
        self._nonfinite_steps = 0
        self._step_loss_finite = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss_finite = self._step_loss_finite and bool(torch.isfinite(loss.detach()).all())
        return loss

    # transformers 5 has no public hook that sees the step's gradient norm before the optimizer uses it
    # (on_pre_optimizer_step receives none), so this overrides the private one that computes it
    def _get_grad_norm(self, model, grad_norm=None):
        """The step's gradient norm (Trainer's), checked with the step's loss before the optimizer uses them.

        A non-finite one stops training before the update (the last checkpoint stays the last good state),
        unless `nonfinite_patience` more are allowed: then this step's gradients are zeroed. The norm is
        the same on every rank; the local loss decides only in a single process, so ranks never disagree.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm)
        norm = float(grad_norm) if grad_norm is not None else 0.0
        loss_ok = self._step_loss_finite or self.args.world_size > 1
        self._step_loss_finite = True
        if math.isfinite(norm) and loss_ok:
            self._nonfinite_steps = 0
            return grad_norm
        self._nonfinite_steps += 1
        step = self.state.global_step + 1
        if self._nonfinite_steps > self.nonfinite_patience:
            what = "loss" if not loss_ok else "gradient norm"
            raise NonFiniteTraining(
                f"training stopped at step {step}: the {what} is not finite ({self._nonfinite_steps} step(s) in a "
                f"row, train.nonfinite_patience={self.nonfinite_patience})")
        logger.warning("step %d: non-finite loss or gradient norm; its update uses zeroed gradients", step)
        model.zero_grad()
        return grad_norm

    # no public hook chooses where a checkpoint is written before it is final (on_save runs after the write)
    def _save_checkpoint(self, model, trial):
        final_root = self.args.output_dir
        staging_root = os.path.join(final_root, ".staging")
        name = f"checkpoint-{self.state.global_step}"
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = final_root
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(final_root, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging_root, name), target)
            shutil.rmtree(staging_root, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging_root):
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    staging_root, final_root, 1
                )
            rotate_checkpoints(
                output_dir=final_root,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class LoraftTrainer(RunGuarantees, Trainer):
    """Trainer with the run's guarantees (RunGuarantees), length-grouped sampling and the supervised-only loss.

    The sampler and the loss are loraft's faster equivalents (loraft.batching, loraft.loss), measured in
    docs/benchmarks.md; each falls back to Trainer's own where it does not apply.
    """

    def __init__(self, *args, plan=None, **kwargs):
        """Args:
            plan: the run's loraft.plan.Plan: its sampler, sub-batch size, fused loss and packing (None: Trainer's
                own behaviour for all four).
        """
        super().__init__(*args, **kwargs)
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
        return self._training_step(model, inputs, num_items_in_batch)

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


class MetricsCallback(TrainerCallback):
    """Append every logged step to the run's metrics.jsonl (rank 0 only); the loss curve is drawn from it."""

    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).metrics_file

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class RunRecordCallback(TrainerCallback):
    """Keep the run record current while training (rank 0 only): `total_steps` once Trainer has computed it
    (max_steps, or the epochs' optimizer steps)."""

    def __init__(self, run_dir: Path):
        self.run = RunDir(run_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.run.record().get("total_steps") != state.max_steps:
            self.run.update(total_steps=state.max_steps)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(KeyboardInterrupt):
    """A stop signal that arrived before training began (data, model loading): raised at once, like Ctrl-C's
    KeyboardInterrupt, so libraries clean up as they do for one; nothing is lost, no step has run."""


class StopRequest:
    """SIGTERM or SIGINT asks the run to stop; a second signal aborts at once.

    Before training begins, a signal raises StopRequested at once. Once it has begun (`training`, set by
    GracefulStop), a signal is only noted: GracefulStop ends the current optimizer step, saves a checkpoint and
    ends training; a signal after the last step lets the final save finish. The first signal puts back the OS's
    default action for both, so a second one ends the process at once, even inside a long C call: the checkpoint
    being written is left in `.staging` and the previous one stays intact.

    A context manager: the handlers are installed only in the main thread (Python allows no other; elsewhere
    `request()` is the only way in) and the previous ones restored on exit.
    """

    def __init__(self, announce: bool = True):
        self.signal_name: Optional[str] = None
        self.training = False
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def request(self, reason: str = "request") -> None:
        """Ask for the stop without a signal (another thread, a UI): noted, whatever the phase."""
        self.signal_name = self.signal_name or reason

    def _handle(self, number, frame) -> None:
        self.signal_name = signal.Signals(number).name
        for each in STOP_SIGNALS:
            signal.signal(each, signal.SIG_DFL)
        when = "after the current step, with a checkpoint" if self.training else "before training starts"
        if self.announce:  # os.write: a signal handler must not re-enter a buffered stream tqdm may be writing
            os.write(2, f"\nloraft: {self.signal_name}: stopping {when}; signal again to abort at once\n".encode())
        if not self.training:
            raise StopRequested(self.signal_name)


class GracefulStop(TrainerCallback):
    """Stop at the end of an optimizer step once the StopRequest has a signal: log the step, save a checkpoint
    (LoraftTrainer's atomic path) and end training; `stopped_at` is then the step.

    Under several processes the ranks agree at every step (one all-reduce of a flag: the maximum), so all stop at
    the same step even when only one got the signal (`loraft stop` signals rank 0); a rank that stopped alone
    would leave the others waiting in the next step's collectives.
    """

    def __init__(self, request: StopRequest):
        self.request = request
        self.stopped_at: Optional[int] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.request.training = True

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.request.signal_name is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested and state.global_step < state.max_steps:  # at max_steps the run finishes anyway
            control.should_log = control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def build_training_arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool, arguments_class=None,
                             **extra):
    """Translate `train.*` and the run's plan (precision, device, batch layout, optimizer) into transformers
    TrainingArguments (checkpoints under run_dir/checkpoints).

    Args:
        arguments_class: a TrainingArguments subclass (TRL's DPOConfig, ...; default TrainingArguments itself).
        extra: its own fields (beta, loss_type, ...), or overrides of the ones set here.
    """
    train = config.train
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if train.eval_steps else "epoch"
    sampling = "random" if plan.sampler == "length_grouped" else plan.sampler
    arguments = dict(
        output_dir=str(run_dir / CHECKPOINTS),
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=plan.samples_per_batch,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        optim=plan.optimizer,
        max_grad_norm=train.max_grad_norm,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.use_cpu,
        # every adapter method uses all its trainable parameters each forward, so DDP need not search for unused ones
        ddp_find_unused_parameters=False,
        activation_checkpointing=plan.gradient_checkpointing,
        # length_grouped is LoraftTrainer's own sampler
        train_sampling_strategy=sampling,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=train.eval_steps,
        seed=train.seed,
        data_seed=train.seed,
        dataloader_num_workers=train.dataloader_num_workers,
        report_to=train.report_to or "none",
        remove_unused_columns=True,
        include_num_input_tokens_seen="non_padding",
    )
    arguments.update(extra)
    return (arguments_class or TrainingArguments)(**arguments)


REWARD_CURVES = (("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward"),
                 ("rewards/margins", "margin"))


def plot_loss(metrics_path: Path, png_path: Path) -> bool:
    """Draw training (and eval) loss against optimizer step, and for a preference run (TRL's `rewards/*` logged)
    a second panel with the chosen and rejected rewards, their margin and the reward accuracy; returns False when
    nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points, eval_points = [], []
    rewards: dict[str, list] = {key: [] for key, _ in REWARD_CURVES + (("rewards/accuracies", ""),)}
    for record in read_metrics(metrics_path):
        if "loss" in record:
            train_points.append((record["step"], record["loss"]))
        elif "train_loss" in record and not train_points:
            # a run shorter than logging_steps: plot its mean loss at the last step
            train_points.append((record["step"], record["train_loss"]))
        if "eval_loss" in record:
            eval_points.append((record["step"], record["eval_loss"]))
        for key, points in rewards.items():
            if key in record and "loss" in record:
                points.append((record["step"], record[key]))
    if not train_points and not eval_points:
        return False
    has_rewards = any(rewards.values())
    figure, axes = plt.subplots(2 if has_rewards else 1, 1, figsize=(7, 7 if has_rewards else 4), dpi=100,
                                squeeze=False)
    axis = axes[0][0]
    if train_points:
        axis.plot(*zip(*train_points), marker="o", markersize=3, label="train loss")
    if eval_points:
        axis.plot(*zip(*eval_points), marker="s", markersize=4, label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(f"loraft: {png_path.parent.name}")
    axis.grid(alpha=0.3)
    axis.legend()
    if has_rewards:
        axis = axes[1][0]
        for key, label in REWARD_CURVES:
            if rewards[key]:
                axis.plot(*zip(*rewards[key]), marker="o", markersize=3, label=label)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("implicit reward")
        axis.grid(alpha=0.3)
        if rewards["rewards/accuracies"]:
            accuracy = axis.twinx()
            accuracy.plot(*zip(*rewards["rewards/accuracies"]), color="grey", linestyle="--", label="reward accuracy")
            accuracy.set_ylim(-0.05, 1.05)
            accuracy.set_ylabel("reward accuracy")
            accuracy.legend(loc="lower right")
        axis.legend(loc="upper left")
    figure.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, png_path)
    return True
