"""The Trainer loraft runs, its callbacks, and the mapping of `train.*` onto TrainingArguments.

`RunGuarantees` is what every trainer of a run has, whatever computes its loss, on transformers' public hooks:
atomic checkpoints (AtomicCheckpoints.on_save renames each from `.staging/`, Trainer's output_dir) and a stop on a
non-finite loss or gradient before the optimizer uses it (NonFiniteStop.on_pre_optimizer_step). SFT's
`LoraftTrainer` is transformers' Trainer with those plus three changes, each measured: a length-grouped sampler,
the supervised-only fused loss (loraft.loss) and forward/backward in token-bounded sub-batches (loraft.batching).
Each falls back to Trainer's own behaviour where it does not apply; tests/test_trainer.py checks each on its own.
The preference objectives mix RunGuarantees into TRL's trainers (loraft.objectives).

The graceful stop is a callback too: `StopRequest` turns SIGTERM/SIGINT into a request, `GracefulStop` ends the
current optimizer step, saves a checkpoint through the same atomic path and ends training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from loraft.config import RunConfig
from loraft.errors import RunError
from loraft.rundir import CHECKPOINTS, RunDir

logger = logging.getLogger("loraft")


class NonFiniteTraining(RunError):
    """Training met a NaN/inf loss or gradient norm more often in a row than train.nonfinite_patience allows."""


class NonFiniteStop(TrainerCallback):
    """Stops training on a non-finite loss or gradient before the optimizer uses it (on_pre_optimizer_step), so the
    last checkpoint stays the last good state; within `patience` non-finite steps in a row, the step's gradients
    are zeroed instead. RunGuarantees.training_step reports each micro-batch's loss (saw_loss)."""

    def __init__(self, patience: int = 0):
        self.patience = patience
        self.nonfinite_steps = 0
        self.loss_finite = True

    def saw_loss(self, loss) -> None:
        self.loss_finite = self.loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads_finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        # the local loss decides only in a single process; several agree on the gradients (all-reduced, or
        # sharded: then the flag is reduced), so ranks never disagree
        loss_ok = self.loss_finite or args.world_size > 1
        self.loss_finite = True
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([float(grads_finite)], device=grads[0].device if grads else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            grads_finite = bool(flag.item())
        if grads_finite and loss_ok:
            self.nonfinite_steps = 0
            return
        self.nonfinite_steps += 1
        step = state.global_step + 1
        if self.nonfinite_steps > self.patience:
            what = "loss" if not loss_ok else "gradient norm"
            raise NonFiniteTraining(
                f"training stopped at step {step}: the {what} is not finite ({self.nonfinite_steps} step(s) in a "
                f"row, train.nonfinite_patience={self.patience})")
        logger.warning("step %d: non-finite loss or gradient norm; its update uses zeroed gradients", step)
        model.zero_grad()


STAGING = ".staging"  # Trainer writes each checkpoint here (TrainingArguments.output_dir); AtomicCheckpoints renames it


class AtomicCheckpoints(TrainerCallback):
    """Checkpoints appear whole or not at all: Trainer writes checkpoint-N under `final_root/.staging` (its
    output_dir), and on_save renames it into `final_root`, then rotates by save_total_limit. A crash mid-save leaves
    only the staging folder, which no resume reads. A checkpoint holds the trained adapter only: folders peft wrote
    for the model's other adapters (TRL's frozen reference copy, "ref") are removed before the rename."""

    def __init__(self, final_root: Path):
        self.final_root = Path(final_root)

    def on_save(self, args, state, control, model=None, **kwargs):
        from accelerate import PartialState

        staging_root = Path(args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        PartialState().wait_for_everyone()  # every rank has written its RNG state into the staged folder
        if args.should_save:
            staged, target = staging_root / name, self.final_root / name
            for adapter in _untrained_adapters(model):
                shutil.rmtree(staged / adapter, ignore_errors=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
            shutil.rmtree(staging_root, ignore_errors=True)
            if state.best_model_checkpoint and state.best_model_checkpoint.startswith(str(staging_root)):
                state.best_model_checkpoint = state.best_model_checkpoint.replace(str(staging_root),
                                                                                  str(self.final_root), 1)
            rotate_checkpoints(output_dir=str(self.final_root), save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=False)
        PartialState().wait_for_everyone()


def _untrained_adapters(model) -> list[str]:
    """The names of a PeftModel's adapters that are not active (peft saves each beside the active one)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return []
    active = set(getattr(model, "active_adapters", None) or [])
    return [name for name in configs if name not in active]


def trained_adapters(model) -> Optional[list[str]]:
    """The adapters a save writes (peft's selected_adapters): the active ones; None (all) for a single adapter."""
    untrained = _untrained_adapters(model)
    return [name for name in model.peft_config if name not in untrained] if untrained else None


class RunGuarantees:
    """What every trainer of a loraft run has, whatever computes its loss (LoraftTrainer for SFT, TRL's trainers in
    loraft.objectives): atomic checkpoints (AtomicCheckpoints) and the stop on a non-finite loss or gradient norm
    (NonFiniteStop), both callbacks on public hooks; training_step (public) reports each loss to the latter.

    Mixed in before a transformers Trainer subclass: `class T(RunGuarantees, SomeTrainer)`. Its
    TrainingArguments.output_dir is the staging folder (build_training_arguments sets it).
    """

    def __init__(self, *args, nonfinite_patience: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite = NonFiniteStop(nonfinite_patience)
        self.add_callback(self.nonfinite)
        self.add_callback(AtomicCheckpoints(Path(self.args.output_dir).parent))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.saw_loss(loss)
        return loss


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
        output_dir=str(run_dir / CHECKPOINTS / STAGING),  # AtomicCheckpoints renames each into checkpoints/
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
