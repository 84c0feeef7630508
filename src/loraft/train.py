"""Build the Trainer and run it; write a self-describing run directory.

A finished run directory holds:
    adapter_config.json, adapter_model.safetensors   the adapter, standard peft format
    tokenizer files + chat_template                  the training template, for apply_chat_template
    config.yaml                                      the resolved config
    data_report.json                                 what the data stage read, kept, dropped and truncated
    metrics.jsonl, loss.png                          every logged step, and the loss curve
    train.log                                        what loraft decided (e.g. tied embeddings)
    loraft_run.json                                  status, versions, base model, template, timings
    checkpoints/checkpoint-N                         Trainer checkpoints, for --resume
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from loraft.config import RunConfig, save_config
from loraft.errors import LoraftError, RunError
from loraft.rundir import (CHECKPOINTS, RUN_FILE, last_complete_checkpoint, read_record, read_run_status,
                           write_json_atomically, write_text_atomically)

logger = logging.getLogger("loraft")

# What a run writes into its directory besides checkpoints/: a fresh start clears these of an earlier run.
RUN_RECORDS = (
    "metrics.jsonl", "loss.png", "train.log", "config.yaml", "data_report.json", "adapter_config.json",
    "adapter_model.safetensors", "adapter_model.bin", "README.md", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
)


def clear_previous_run(run_dir: Path) -> None:
    """Remove an earlier run's adapter, records, evaluation and checkpoints before a fresh start in its directory.

    A fresh start there (overwrite=true, or an unfinished run that left no checkpoint) must not leave the old
    adapter beside the new config if it is killed, nor append to the old run's metrics.
    """
    for name in RUN_RECORDS:
        (run_dir / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS, "eval", ".adapter-staging", ".tokenizer-staging"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut off by a crash or a full disk is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics logged up to `last_step` (the checkpoint a resume starts from), so the steps between
    that checkpoint and a crash are logged once, by the resumed run; rewritten atomically."""
    if not path.is_file():
        return
    # the end-of-training summary (train_loss, ...) is written again by the resumed run
    kept = [record for record in read_metrics(path) if record["step"] <= last_step and "train_loss" not in record]
    write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))


def run_identity(config: RunConfig, report: dict) -> dict:
    """What makes a run's function: a resume that changes any of these continues a different training."""
    return {
        "model.name_or_path": config.model.name_or_path, "model.revision": config.model.revision,
        "data.template": config.data.template, "data.max_length": config.data.max_length,
        "the training data (its content, tokenizer or field mapping)": report.get("fingerprint"),
        "adapter": config.adapter.model_dump(), "train.seed": config.train.seed,
    }


def check_resume_identity(run_dir: Path, saved: Optional[dict], config: RunConfig, report: dict) -> None:
    """Refuse a resume whose config changes the function the checkpoint was trained for (one sentence);
    log an extension (more max_steps or epochs)."""
    if not saved or "identity" not in saved:
        logger.warning("%s: the run records no identity (an older loraft); resuming without checking it", run_dir)
        return
    current = run_identity(config, report)
    for key, old in saved["identity"].items():
        new = current.get(key)
        if key == "adapter" and old != new:
            changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
            key, old, new = f"adapter.{changed[0]}", old.get(changed[0]), new.get(changed[0])
        if old != new:
            raise RunError(f"{run_dir}: --resume refused: {key} changed ({old!r} -> {new!r}) since the checkpoint "
                           "was trained; start a new output_dir, or pass overwrite=true to train again from scratch")
    previous = saved.get("length") or {}
    for key, value in (("train.max_steps", config.train.max_steps),
                       ("train.num_train_epochs", config.train.num_train_epochs)):
        if key in previous and previous[key] != value:
            logger.info("resume extends the run: %s %s -> %s", key, previous[key], value)


def _identity_fields(config: RunConfig, report: dict) -> dict:
    return {"identity": run_identity(config, report),
            "length": {"train.max_steps": config.train.max_steps, "train.num_train_epochs": config.train.num_train_epochs}}


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name[len("checkpoint-"):])


def _finish_from_checkpoint(trainer, checkpoint: Path):
    """Load a checkpoint's weights into the trainer's model without training; a TrainOutput like train()'s."""
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(str(checkpoint))
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainOutput(state["global_step"], loss, {"train_loss": loss, "finished_from_checkpoint": str(checkpoint)})


def check_run_dir(config: RunConfig, resume: bool) -> Optional[Path]:
    """Refuse to overwrite a finished run; find the checkpoint to resume from.

    Returns:
        the checkpoint to resume from, or None for a fresh start.
    """
    run_dir = Path(config.output_dir)
    status = read_run_status(run_dir)
    if resume:
        checkpoint = last_complete_checkpoint(run_dir / CHECKPOINTS)
        if checkpoint is None:
            raise RunError(f"{run_dir}: --resume found no complete checkpoint under {run_dir / CHECKPOINTS}")
        if status == "finished" and not config.overwrite:
            raise RunError(f"{run_dir}: the run already finished; pass overwrite=true to train it again")
        return checkpoint
    if status == "finished" and not config.overwrite:
        raise RunError(
            f"{run_dir}: holds a finished run; choose another output_dir or pass overwrite=true to replace it"
        )
    if run_dir.is_dir() and any(run_dir.iterdir()) and status is None and not config.overwrite:
        raise RunError(f"{run_dir}: exists and is not empty; choose another output_dir or pass overwrite=true")
    if status is not None and status != "finished" and not config.overwrite:
        if last_complete_checkpoint(run_dir / CHECKPOINTS) is not None:
            raise RunError(
                f"{run_dir}: holds an unfinished run with checkpoints; pass --resume to continue it "
                "or overwrite=true to start again"
            )
    return None


def _make_trainer_class():
    import torch
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class LoraftTrainer(Trainer):
        """Trainer with atomic checkpoints, length-grouped sampling and the supervised-only loss.

        Trainer writes checkpoint-N in place, so a crash mid-save leaves a half-written checkpoint that
        `resume_from_checkpoint` would pick. Writing under `.staging/` and renaming avoids that.
        The sampler and the loss are loraft's faster equivalents (loraft.batching, loraft.loss), measured in
        docs/benchmarks.md; each falls back to Trainer's own where it does not apply.
        """

        def __init__(self, *args, length_grouped: bool = False, supervised_loss: bool = False,
                     micro_batch_tokens: int = 0, nonfinite_patience: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.nonfinite_patience = nonfinite_patience
            self._nonfinite_steps = 0
            self._step_loss_finite = True
            self.length_grouped = length_grouped
            self.supervised_loss = supervised_loss
            self.micro_batch_tokens = micro_batch_tokens
            self._loss_parts = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = self._training_step(model, inputs, num_items_in_batch)
            self._step_loss_finite = self._step_loss_finite and bool(torch.isfinite(loss.detach()).all())
            return loss

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

        def _training_step(self, model, inputs, num_items_in_batch=None):
            """Forward/backward the step's batch in sub-batches of at most micro_batch_tokens padded tokens.

            Each sub-batch's loss is its supervised-token sum over the whole step's count, so the gradients add
            up to the unsplit batch's. Without that count (a model that takes no loss kwargs) it runs unsplit.
            Under DDP only the last sub-batch's backward synchronises gradients: ranks may split their batches
            into different numbers of sub-batches, and each must join exactly one all-reduce per step.
            """
            mask = inputs.get("attention_mask")
            if (not self.micro_batch_tokens or num_items_in_batch is None or mask is None or mask.dim() != 2
                    or mask.shape[0] * mask.shape[1] <= self.micro_batch_tokens):
                return super().training_step(model, inputs, num_items_in_batch)
            import contextlib

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

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if not self.length_grouped or dataset is None or not hasattr(dataset, "__len__"):
                return super()._get_train_sampler(train_dataset)
            from loraft.batching import LengthGroupedSampler, sample_lengths

            # the columns Trainer removed may include `length`; the original dataset still has it
            source = self.train_dataset if len(self.train_dataset) == len(dataset) else dataset
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(sample_lengths(source), self.args.per_device_train_batch_size, seed=seed)

        def _supervised_loss_parts(self, model):
            """(model body, lm_head) when the fused loss can replace the model's own, else None."""
            if self._loss_parts is None:
                from loraft.loss import supports_supervised_loss

                parts = False
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                peft_config = getattr(model, "active_peft_config", None)
                prompt_learning = getattr(peft_config, "is_prompt_learning", False)
                # a wrapped model (DDP, FSDP, DeepSpeed) must be called as a whole for its gradient hooks
                unwrapped = self.accelerator.unwrap_model(model) is model
                if unwrapped and not prompt_learning and supports_supervised_loss(base):
                    parts = (base.base_model, base.get_output_embeddings())
                self._loss_parts = parts
            return self._loss_parts or None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            parts = None
            if (self.supervised_loss and model.training and not return_outputs and "labels" in inputs
                    and self.label_smoother is None and self.compute_loss_func is None):
                parts = self._supervised_loss_parts(model)
            if parts is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from loraft.loss import supervised_cross_entropy

            body, head = parts
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            # accelerate applies autocast by wrapping the model's forward, which calling the body skips
            with self.accelerator.autocast():
                hidden = body(**inputs, use_cache=False).last_hidden_state
                # the same normalisation as the model's own loss: over the optimizer step when Trainer counted it
                count = num_items_in_batch if self.model_accepts_loss_kwargs else None
                return supervised_cross_entropy(hidden, labels, head.weight, count)

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

    return LoraftTrainer


class NonFiniteTraining(RunError):
    """Training met a NaN/inf loss or gradient norm more often in a row than train.nonfinite_patience allows."""


def _make_metrics_callback(run_dir: Path):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Append every logged step to metrics.jsonl (rank 0 only)."""

        def __init__(self):
            self.path = run_dir / "metrics.jsonl"

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    return MetricsCallback()


def build_training_arguments(config: RunConfig, run_dir: Path, has_eval: bool):
    """Translate `train.*` into transformers TrainingArguments (checkpoints under run_dir/checkpoints)."""
    import torch
    from transformers import TrainingArguments

    from loraft.batching import plan_micro_batches
    from loraft.precision import resolve_precision

    train = config.train
    precision = resolve_precision(train.precision, config.model.device)
    micro_batch, accumulation = plan_micro_batches(
        train.per_device_train_batch_size, train.gradient_accumulation_steps, micro_batch_tokens(config)
    )
    use_cpu = config.model.device == "cpu" or not (torch.cuda.is_available() or config.model.device.startswith("cuda"))
    if precision == "fp16" and use_cpu:
        raise RunError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if train.eval_steps else "epoch"
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        optim=train.optim,
        max_grad_norm=train.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=use_cpu,
        # every adapter method uses all its trainable parameters each forward, so DDP need not search for unused ones
        ddp_find_unused_parameters=False,
        activation_checkpointing=train.gradient_checkpointing,
        # length_grouped is LoraftTrainer's own sampler
        train_sampling_strategy="random" if train.sampling == "length_grouped" else train.sampling,
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


def micro_batch_tokens(config: RunConfig) -> int:
    """`train.micro_batch_tokens` resolved for this machine's precision (loraft.batching.micro_batch_budget)."""
    from loraft.batching import micro_batch_budget
    from loraft.precision import resolve_precision

    precision = resolve_precision(config.train.precision, config.model.device)
    return micro_batch_budget(config.train.micro_batch_tokens, precision, config.data.max_length)


def plot_loss(metrics_path: Path, png_path: Path) -> bool:
    """Draw training (and eval) loss against optimizer step; returns False when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points, eval_points = [], []
    for record in read_metrics(metrics_path):
        if "loss" in record:
            train_points.append((record["step"], record["loss"]))
        elif "train_loss" in record and not train_points:
            # a run shorter than logging_steps: plot its mean loss at the last step
            train_points.append((record["step"], record["train_loss"]))
        if "eval_loss" in record:
            eval_points.append((record["step"], record["eval_loss"]))
    if not train_points and not eval_points:
        return False
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if train_points:
        axis.plot(*zip(*train_points), marker="o", markersize=3, label="train loss")
    if eval_points:
        axis.plot(*zip(*eval_points), marker="s", markersize=4, label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(f"loraft: {png_path.parent.name}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, png_path)
    return True


def save_adapter_atomically(model, run_dir: Path) -> None:
    """Write the peft adapter to a staging dir, then move each file into the run dir."""
    staging = run_dir / ".adapter-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    for item in staging.iterdir():
        os.replace(item, run_dir / item.name)
    staging.rmdir()


def save_tokenizer_with_template(tokenizer, template, run_dir: Path) -> None:
    """Save the tokenizer with the training template as its chat_template."""
    tokenizer.chat_template = template.jinja
    staging = run_dir / ".tokenizer-staging"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    for item in staging.iterdir():
        os.replace(item, run_dir / item.name)
    staging.rmdir()


def _versions() -> dict:
    import datasets
    import peft
    import torch
    import transformers

    import loraft

    return {
        "loraft": loraft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
    }


def _attach_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def train(config: RunConfig, resume: bool = False, callbacks: Optional[list] = None, prepared=None,
          progress_bar: bool = True) -> Path:
    """Fine-tune `config.model` on `config.data` with the configured adapter; returns the run directory.

    Runs unchanged under torchrun / accelerate launch: data is tokenized once (main process first, then
    read from the cache by the others) and only rank 0 writes the run directory.

    Args:
        config: the resolved run config.
        resume: continue from the newest complete checkpoint in `output_dir/checkpoints`.
        callbacks: extra transformers TrainerCallbacks (tests use them to look at the live model).
        prepared: already tokenized data (`train`, `eval`, `report`) instead of running the data stage
            (benchmarks/train_speed.py feeds every trainer the same token ids this way).
        progress_bar: Trainer's tqdm bar and log echo; off when a callback reports progress (the demo).
    """
    from transformers import DataCollatorForSeq2Seq, set_seed

    from loraft.bloom import uses_fast_bloom
    from loraft.data import prepare_datasets
    from loraft.model import count_parameters, load_model_for_training, load_tokenizer
    from loraft.templates import get_template

    run_dir = Path(config.output_dir)
    resume_from = check_run_dir(config, resume)
    template = get_template(config.data.template)
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    # The arguments also set up the distributed state, so build them before touching the data.
    has_eval = bool(config.data.eval_path) or config.data.eval_fraction > 0
    args = build_training_arguments(config, run_dir, has_eval=has_eval)
    is_main = args.process_index == 0
    handler = None
    if is_main:
        if resume_from is not None:
            trim_metrics(run_dir / "metrics.jsonl", _checkpoint_step(resume_from))
        elif read_run_status(run_dir) is not None:  # check_run_dir allowed a fresh start over an earlier run
            clear_previous_run(run_dir)
            write_json_atomically(run_dir / RUN_FILE, {"status": "running", "base_model": config.model.name_or_path,
                                                       "started": time.time()})
        run_dir.mkdir(parents=True, exist_ok=True)
        if read_run_status(run_dir) is None:  # mark the directory as a loraft run before anything else lands in it
            write_json_atomically(run_dir / RUN_FILE, {"status": "running", "base_model": config.model.name_or_path,
                                                       "started": time.time()})
        handler = _attach_file_log(run_dir)
    started = time.time()
    try:
        if prepared is None:
            with args.main_process_first(desc="tokenize the training data"):
                prepared = prepare_datasets(config, tokenizer)
        if resume_from is not None:
            check_resume_identity(run_dir, read_record(run_dir), config, prepared.report)
        if is_main:
            save_config(config, run_dir / "config.yaml")
            write_json_atomically(run_dir / "data_report.json", prepared.report)
            write_json_atomically(
                run_dir / RUN_FILE,
                {"status": "running", "base_model": config.model.name_or_path, "template": template.name,
                 "started": started, "versions": _versions(), **_identity_fields(config, prepared.report)},
            )
            logger.info(
                "data: %s samples kept of %s records (%s dropped, %s truncated)",
                prepared.report.get("samples_kept"), prepared.report.get("records_read"),
                sum(prepared.report.get("dropped", {}).values()), prepared.report.get("truncated_samples"),
            )
        set_seed(config.train.seed)
        model, info = load_model_for_training(config, tokenizer)
        if info["target_matches"]:
            logger.info("adapter targets %d modules: %s", len(info["target_matches"]), ", ".join(info["target_matches"]))
        trainable, total = count_parameters(model)
        budget = micro_batch_tokens(config)
        logger.info("trainable params: %d of %d (%.4f%%)", trainable, total, 100.0 * trainable / max(total, 1))
        logger.info(
            "compute: %s precision, %d process(es) x %d sample(s) per batch x %d accumulated, %s, %s order, "
            "%s loss%s",
            "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32", args.world_size,
            args.per_device_train_batch_size, args.gradient_accumulation_steps,
            f"forward/backward in sub-batches of <= {budget} padded tokens" if budget else "no sub-batches",
            config.train.sampling,
            # a wrapped model (DDP, FSDP, DeepSpeed) keeps the model's own loss (LoraftTrainer._supervised_loss_parts)
            "supervised-only" if config.train.supervised_loss and args.world_size == 1 else "full-logits",
            ", BLOOM SDPA-alibi attention and one-kernel GELU" if uses_fast_bloom(model) else "",
        )
        trainer_class = _make_trainer_class()
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=prepared.train,
            eval_dataset=prepared.eval,
            processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
            callbacks=([_make_metrics_callback(run_dir)] if is_main else []) + list(callbacks or []),
            length_grouped=config.train.sampling == "length_grouped",
            supervised_loss=config.train.supervised_loss,
            micro_batch_tokens=budget,
            nonfinite_patience=config.train.nonfinite_patience,
        )
        if not progress_bar:
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            trainer.remove_callback(ProgressCallback)
            trainer.remove_callback(PrinterCallback)
        try:
            if resume_from is not None and _checkpoint_step(resume_from) >= args.max_steps > 0:
                # killed after its last checkpoint: only the final save is left. Trainer would train one more
                # step before it checks max_steps.
                result = _finish_from_checkpoint(trainer, resume_from)
            else:
                result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except NonFiniteTraining as exc:
            checkpoint = last_complete_checkpoint(run_dir / CHECKPOINTS)
            if is_main:
                write_json_atomically(run_dir / RUN_FILE, {
                    **(read_record(run_dir) or {}), "status": "failed", "reason": str(exc),
                    "last_good_checkpoint": str(checkpoint) if checkpoint else None, "started": started,
                    "failed": time.time(), "versions": _versions()})
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written before it"
            raise NonFiniteTraining(f"{run_dir}: {exc}; status failed, {kept}") from None
        if trainer.is_world_process_zero():
            save_adapter_atomically(model, run_dir)
            save_tokenizer_with_template(tokenizer, template, run_dir)
            plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
            write_json_atomically(
                run_dir / RUN_FILE,
                {
                    "status": "finished",
                    "base_model": config.model.name_or_path,
                    "template": template.name,
                    "adapter_method": config.adapter.method,
                    "tied_embeddings": info["tied_embeddings"],
                    "target_matches": info["target_matches"],
                    "trainable_params": trainable,
                    "total_params": total,
                    "global_step": result.global_step,
                    "train_loss": result.training_loss,
                    "train_metrics": result.metrics,
                    "resumed_from": str(resume_from) if resume_from else None,
                    **_identity_fields(config, prepared.report),
                    "started": started,
                    "finished": time.time(),
                    "versions": _versions(),
                },
            )
            logger.info("finished: %d steps, train loss %.4f, run dir %s", result.global_step, result.training_loss, run_dir)
        trainer.accelerator.wait_for_everyone()
    except LoraftError as exc:
        # bad data, a model that cannot load, ...: the directory says so, and a corrected rerun may start over
        if is_main and not isinstance(exc, NonFiniteTraining) and read_run_status(run_dir) != "finished":
            write_json_atomically(run_dir / RUN_FILE, {**(read_record(run_dir) or {}), "status": "failed",
                                                       "reason": str(exc), "failed": time.time()})
        raise
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
    return run_dir

