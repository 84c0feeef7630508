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
from loraft.files import staged_directory, write_json_atomically
from loraft.plan import plan_run, read_model_config
from loraft.rundir import RunDir

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
    from loraft.model import count_parameters, load_model_for_training, load_tokenizer
    from loraft.templates import get_template
    # Trainer (and its integrations) imports in seconds: only a run needs it, not `loraft plan`
    from loraft.trainer import LoraftTrainer, MetricsCallback, NonFiniteTraining, build_training_arguments, plot_loss

    run = RunDir(config.output_dir)
    run_dir = run.path
    resume_from = run.prepare(config, resume)
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    template = get_template(config.data.template, tokenizer)
    # every machine- and model-dependent decision, once (a first run of a shape here measures the speed choices)
    model_config, _ = read_model_config(config)
    plan = plan_run(config, model_config)
    # The arguments also set up the distributed state, so build them before touching the data.
    has_eval = bool(config.data.eval_path) or config.data.eval_fraction > 0
    args = build_training_arguments(config, plan, run_dir, has_eval=has_eval)
    is_main = args.process_index == 0
    handler = None
    if is_main:
        run.start(config, resume_from)
        handler = _attach_file_log(run.log_file)
        logger.info("%s", plan.describe())
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
                              "started": started, "versions": _versions(), "plan": plan.to_dict(),
                              **run.identity_fields(config, prepared.report)})
            logger.info(
                "data: %s samples kept of %s records (%s dropped, %s truncated)",
                prepared.report.get("samples_kept"), prepared.report.get("records_read"),
                sum(prepared.report.get("dropped", {}).values()), prepared.report.get("truncated_samples"),
            )
        set_seed(config.train.seed)
        model, info = load_model_for_training(config, plan, tokenizer)
        if info["target_matches"]:
            logger.info("adapter targets %d modules: %s", len(info["target_matches"]), ", ".join(info["target_matches"]))
        trainable, total = count_parameters(model)
        logger.info("trainable params: %d of %d (%.4f%%)", trainable, total, 100.0 * trainable / max(total, 1))
        trainer = LoraftTrainer(
            model=model,
            args=args,
            train_dataset=prepared.train,
            eval_dataset=prepared.eval,
            processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
            callbacks=([MetricsCallback(run_dir)] if is_main else []) + list(callbacks or []),
            plan=plan,
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
                    "plan": plan.to_dict(),
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



def preview_plan(config: RunConfig, measure: bool = False) -> dict:
    """What `loraft plan` prints: the run's plan on this machine, without training or reading weights.

    The model's config comes from its folder or the hub, else (offline) a preset's shipped shape; the parameter
    counts from the model built on the meta device; the speed choices from the cache, or measured now with
    `measure`. Returns {"model", "plan", "parameters", "memory", "autotune"}.
    """
    from loraft import tune
    from loraft.model import meta_counts
    from loraft.plan import estimate_memory, world_size_from_env

    model_config, source = read_model_config(config, offline_shape=True)
    plan = plan_run(config, model_config, measure=measure)
    counts = meta_counts(model_config, config.adapter, config.model.trust_remote_code)
    if plan.tuning is not None:
        autotune = f"measured in {plan.tuning['seconds']} s (cached): " + ", ".join(
            f"{key} {value}" for key, value in plan.tuning["choice"].items())
    elif not tune.autotune_enabled(config):
        autotune = "off: the static defaults"
    elif config.train.micro_batch_tokens != "auto":
        autotune = "off: train.micro_batch_tokens is set"
    elif world_size_from_env() > 1:
        autotune = "not measured under several processes: run `loraft plan --measure` once in one process"
    else:
        autotune = (f"not measured yet: the first training measures it (at most ~{tune.BUDGET_SECONDS:.0f} s), "
                    "or `loraft plan --measure` now")
    memory = estimate_memory(plan, config, model_config, counts["total_params"], counts["trainable_params"],
                             counts["embedding_params"])
    return {"model": source, "plan": plan.to_dict(), "describe": plan.describe(),
            "parameters": {"trainable": counts["trainable_params"], "total": counts["total_params"]},
            "memory": memory, "autotune": autotune}
