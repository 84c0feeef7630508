"""A training run, top to bottom: check the run directory, prepare the data, load the model, train, save.

What the run directory holds and guarantees is loraft.rundir's; the Trainer and its callbacks are
loraft.trainer's. Only rank 0 writes the run directory, so `loraft train` runs unchanged under torchrun.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from loraft.config import RunConfig, save_config
from loraft.errors import LoraftError
from loraft.rundir import RunDir, staged_directory, write_json_atomically
from loraft.trainer import NonFiniteTraining, build_training_arguments, micro_batch_tokens, plot_loss

logger = logging.getLogger("loraft")


def save_adapter(model, run_dir: Path) -> None:
    """Write the peft adapter into the run directory, staged and then renamed into place."""
    with staged_directory(run_dir, merge=True, label="adapter") as staging:
        model.save_pretrained(str(staging))


def save_tokenizer_with_template(tokenizer, template, run_dir: Path) -> None:
    """Save the tokenizer with the training template as its chat_template, staged and then renamed into place."""
    tokenizer.chat_template = template.jinja
    with staged_directory(run_dir, merge=True, label="tokenizer") as staging:
        tokenizer.save_pretrained(str(staging))


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


def _attach_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
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

    from loraft.data import prepare_datasets
    from loraft.fastpaths import describe as describe_fast_paths
    from loraft.fastpaths import supports_supervised_loss
    from loraft.model import count_parameters, load_model_for_training, load_tokenizer
    from loraft.templates import get_template
    from loraft.trainer import LoraftTrainer, MetricsCallback

    run = RunDir(config.output_dir)
    run_dir = run.path
    resume_from = run.prepare(config, resume)
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    template = get_template(config.data.template, tokenizer)
    # The arguments also set up the distributed state, so build them before touching the data.
    has_eval = bool(config.data.eval_path) or config.data.eval_fraction > 0
    args = build_training_arguments(config, run_dir, has_eval=has_eval)
    is_main = args.process_index == 0
    handler = None
    if is_main:
        run.start(config, resume_from)
        handler = _attach_file_log(run.log_file)
    started = time.time()
    try:
        if prepared is None:
            with args.main_process_first(desc="tokenize the training data"):
                prepared = prepare_datasets(config, tokenizer)
        if resume_from is not None:
            run.check_resume_identity(config, prepared.report)
        if is_main:
            save_config(config, run.config_file)
            write_json_atomically(run.data_report_file, prepared.report)
            run.write_record({"status": "running", "base_model": config.model.name_or_path, "template": template.name,
                              "started": started, "versions": _versions(),
                              **run.identity_fields(config, prepared.report)})
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
        trainer = LoraftTrainer(
            model=model,
            args=args,
            train_dataset=prepared.train,
            eval_dataset=prepared.eval,
            processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
            callbacks=([MetricsCallback(run_dir)] if is_main else []) + list(callbacks or []),
            length_grouped=config.train.sampling == "length_grouped",
            supervised_loss=config.train.supervised_loss,
            micro_batch_tokens=budget,
            nonfinite_patience=config.train.nonfinite_patience,
            packing=config.train.packing,
        )
        logger.info(
            "compute: %s precision, %d process(es) x %d sample(s) per batch x %d accumulated, %s, %s order, "
            "%s loss%s",
            "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32", args.world_size,
            args.per_device_train_batch_size, args.gradient_accumulation_steps,
            (f"samples packed into rows of <= {budget} tokens" if config.train.packing and trainer.can_pack(model)
             else f"forward/backward in sub-batches of <= {budget} padded tokens" if budget else "no sub-batches"),
            config.train.sampling,
            # a wrapped model (DDP, FSDP, DeepSpeed) keeps the model's own loss (LoraftTrainer._supervised_loss_parts)
            "supervised-only" if config.train.supervised_loss and args.world_size == 1
            and supports_supervised_loss(model.get_base_model()) else "full-logits",
            f", {describe_fast_paths(model)}" if describe_fast_paths(model) else "",
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
            checkpoint = run.last_checkpoint()
            if is_main:
                run.mark("failed", reason=str(exc), last_good_checkpoint=str(checkpoint) if checkpoint else None,
                         started=started, failed=time.time(), versions=_versions())
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written before it"
            raise NonFiniteTraining(f"{run_dir}: {exc}; status failed, {kept}") from None
        if trainer.is_world_process_zero():
            save_adapter(model, run_dir)
            save_tokenizer_with_template(tokenizer, template, run_dir)
            plot_loss(run.metrics_file, run.loss_plot)
            run.write_record(
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
                    **run.identity_fields(config, prepared.report),
                    "started": started,
                    "finished": time.time(),
                    "versions": _versions(),
                },
            )
            logger.info("finished: %d steps, train loss %.4f, run dir %s", result.global_step, result.training_loss, run_dir)
        trainer.accelerator.wait_for_everyone()
    except LoraftError as exc:
        # bad data, a model that cannot load, ...: the directory says so, and a corrected rerun may start over
        if is_main and not isinstance(exc, NonFiniteTraining) and run.status() != "finished":
            run.mark("failed", reason=str(exc), failed=time.time())
        raise
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
    return run_dir

