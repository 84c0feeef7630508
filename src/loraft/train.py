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
from loraft.errors import ConfigError, LoraftError
from loraft.files import staged_directory, write_json_atomically
from loraft.plan import plan_run, read_model_config, with_data
from loraft.liveness import RunLock, refuse_if_live
from loraft.rundir import RunDir, checkpoint_step, local_time

logger = logging.getLogger("loraft")


def truncation(report: dict) -> str:
    """What the data report says was cut, in train.log's words, for each record kind's report."""
    if "truncated_samples" in report:  # sft
        return f"{report['truncated_samples']} truncated"
    if "truncated_prompts" in report:  # preference pairs
        completions = sum((report.get("truncated_completions") or {}).values())
        return f"{report['truncated_prompts']} prompts and {completions} completions truncated"
    return "none truncated: a prompt over data.max_length is dropped"  # grpo prompts


def save_adapter(model, run_dir: Path) -> None:
    """Write the peft adapter into the run directory, staged and then renamed into place (the trained adapter
    only: not a preference run's frozen reference copy)."""
    from loraft.trainer import trained_adapters

    with staged_directory(run_dir, merge=True, label="adapter") as staging:
        model.save_pretrained(str(staging), selected_adapters=trained_adapters(model))


def save_tokenizer_with_template(tokenizer, template, run_dir: Path) -> None:
    """Save the tokenizer with the training template as its chat_template, staged and then renamed into place."""
    tokenizer.chat_template = template.jinja
    with staged_directory(run_dir, merge=True, label="tokenizer") as staging:
        tokenizer.save_pretrained(str(staging))


def _finish_from_checkpoint(trainer, checkpoint: Path):
    """Load a checkpoint's adapter into the trainer's model without training (peft's public loader); a TrainOutput
    like train()'s."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers.trainer_utils import TrainOutput

    model = trainer.accelerator.unwrap_model(trainer.model)
    set_peft_model_state_dict(model, load_peft_weights(str(checkpoint)), adapter_name=model.active_adapter)
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


def continue_from(config: RunConfig) -> RunConfig:
    """The config with `model.adapter_from` resolved: that finished run's adapter settings replace the adapter
    section (the run continues training that adapter). One sentence when it is no finished run of the same base."""
    from loraft.run_access import open_run

    if not config.model.adapter_from:
        return config
    source = open_run(config.model.adapter_from)
    if source.status != "finished" or source.adapter_dir != source.run_dir:
        raise ConfigError(f"model.adapter_from {config.model.adapter_from}: the run is {source.status}, not "
                          "finished; a run continues only a finished run's adapter")
    base = source.config.model
    if (base.name_or_path, base.revision) != (config.model.name_or_path, config.model.revision):
        raise ConfigError(f"model.adapter_from {config.model.adapter_from}: its adapter was trained on "
                          f"{base.name_or_path}, this run's model.name_or_path is {config.model.name_or_path}")
    if source.config.adapter != config.adapter:
        logger.info("adapter settings from %s (model.adapter_from): %s", config.model.adapter_from,
                    source.config.adapter.model_dump())
    # absolute, so the saved config names the same run from any directory (eval, chat and a resume read it)
    model = config.model.model_copy(update={"adapter_from": str(Path(config.model.adapter_from).resolve())})
    return config.model_copy(update={"adapter": source.config.adapter.model_copy(), "model": model})


class TrainingStopped(Exception):
    """The run stopped on request (SIGTERM or SIGINT) and is resumable: not an error, and not finished.

    The record says `stopped`, with the step and the checkpoint a `--resume` continues from (None: stopped before
    its first checkpoint; the same command starts it again).
    """

    def __init__(self, run_dir: Path, step: int, checkpoint: Optional[Path]):
        self.run_dir, self.step, self.checkpoint = run_dir, step, checkpoint
        where = f"at step {step} ({checkpoint.name})" if checkpoint else "before its first checkpoint"
        super().__init__(f"{run_dir}: stopped {where}")


def train(config: RunConfig, resume: bool = False, callbacks: Optional[list] = None, prepared=None,
          progress_bar: bool = True) -> Path:
    """Fine-tune `config.model` on `config.data` with the configured adapter; returns the run directory.

    Runs unchanged under torchrun / accelerate launch: data is tokenized once (main process first, then
    read from the cache by the others) and only rank 0 writes the run directory. Rank 0 holds the run's lock
    (loraft.liveness.RunLock) from before its first write to its end, so readers can tell a live run from a dead one.

    SIGTERM or SIGINT stops the run gracefully (loraft.trainer.StopRequest): the current optimizer step ends, a
    checkpoint is saved, the record says `stopped` and TrainingStopped is raised; a second signal aborts at once.

    Args:
        config: the resolved run config.
        resume: continue from the newest complete checkpoint in `output_dir/checkpoints`.
        callbacks: extra transformers TrainerCallbacks (tests use them to look at the live model).
        prepared: already tokenized data (`train`, `eval`, `report`) instead of running the data stage
            (benchmarks/train_speed.py feeds every trainer the same token ids this way).
        progress_bar: Trainer's tqdm bar and log echo; off when a callback reports progress (the demo).
    Raises:
        TrainingStopped: the run stopped on a signal, resumable from `checkpoint`.
    """
    from transformers import set_seed

    from loraft.model import count_parameters, load_model_for_training, load_tokenizer
    from loraft.objective_table import objective as look_up
    from loraft.templates import get_template
    # Trainer (and its integrations) imports in seconds: only a run needs it, not `loraft plan`
    from loraft.plots import plot_loss
    from loraft.trainer import (GracefulStop, MetricsCallback, NonFiniteTraining, RunRecordCallback, StopRequest,
                                StopRequested)

    entry = look_up(config.train.objective)
    objective = entry.load()  # its module: prepare, arguments, build_trainer (TRL's for a preference objective)
    objective.check(config)
    config = continue_from(config)
    run = RunDir(config.output_dir)
    run_dir = run.path
    refuse_if_live(run_dir)  # a live trainer's directory, before anything loads (the lock itself is taken below)
    resume_from = run.prepare(config, resume)
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    template = get_template(config.data.template, tokenizer)
    # every machine- and model-dependent decision, once (a first run of a shape here measures the speed choices)
    model_config, _ = read_model_config(config)
    plan = plan_run(config, model_config, data_follows=True)  # GRPO's step is timed once the data is read
    # The arguments also set up the distributed state, so build them before touching the data.
    has_eval = bool(config.data.eval_path) or config.data.eval_fraction > 0
    args = objective.arguments(config, plan, run_dir, has_eval)
    is_main = args.process_index == 0
    # the lock before the first write (only rank 0 writes, the lock file too): a second trainer here is refused
    lock = RunLock(run_dir).acquire() if is_main else None
    stop = StopRequest(announce=is_main)
    graceful = GracefulStop(stop)
    handler, process = None, {}
    started = time.time()
    try:
        if is_main:
            max_steps = config.train.max_steps
            process = run.start(config, resume_from, total_steps=max_steps if max_steps > 0 else None)
            handler = _attach_file_log(run.log_file)
            logger.info("%s", plan.describe())
        with stop:  # installed after start(): a signal before it leaves the directory as it was
            if prepared is None:
                with args.main_process_first(desc="tokenize the training data"):
                    prepared = objective.prepare(config, tokenizer)
            if resume_from is not None:
                run.check_resume_identity(config, prepared.report)
            plan = with_data(plan, config, model_config, prepared.report, log=logger.info if is_main else None)
            if is_main:
                save_config(config, run.config_file)
                write_json_atomically(run.data_report_file, prepared.report)
                run.begin(config, plan, template.name, prepared.report, process, started, _versions())
                logger.info("data: %s samples kept of %s records (%s dropped, %s)", prepared.report.get("samples_kept"),
                            prepared.report.get("records_read"), sum(prepared.report.get("dropped", {}).values()),
                            truncation(prepared.report))
            set_seed(config.train.seed)
            model, info = load_model_for_training(config, plan, tokenizer, attach=entry.attach_adapter)
            if info["target_matches"]:
                logger.info("adapter targets %d modules: %s", len(info["target_matches"]),
                            ", ".join(info["target_matches"]))
            trainer_callbacks = (([MetricsCallback(run_dir), RunRecordCallback(run_dir)] if is_main else [])
                                 + [graceful] + list(callbacks or []))
            trainer = objective.build_trainer(config, plan, args, model, info, tokenizer, prepared,
                                              trainer_callbacks)
            model = trainer.model
            trainable, total = count_parameters(model)
            logger.info("trainable params: %d of %d (%.4f%%)", trainable, total, 100.0 * trainable / max(total, 1))
            if not progress_bar:
                from transformers.trainer_callback import PrinterCallback, ProgressCallback

                trainer.remove_callback(ProgressCallback)
                trainer.remove_callback(PrinterCallback)
            if stop.signal_name is not None:  # asked without a signal (StopRequest.request) before training began
                raise StopRequested(stop.signal_name)
            try:
                if resume_from is not None and checkpoint_step(resume_from) >= args.max_steps > 0:
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
                kept = (f"the last good checkpoint is {checkpoint}" if checkpoint
                        else "no checkpoint was written before it")
                raise NonFiniteTraining(f"{run_dir}: {exc}; status failed, {kept}") from None
            if graceful.stopped_at is not None:  # GracefulStop saved the step's checkpoint and ended training
                stopped = _stopped(run, is_main, run.checkpoint(graceful.stopped_at), stop)
                trainer.accelerator.wait_for_everyone()  # the record says stopped before any rank exits
                raise stopped
            if trainer.is_world_process_zero():
                save_adapter(model, run_dir)
                save_tokenizer_with_template(tokenizer, template, run_dir)
                plot_loss(run.metrics_file, run.loss_plot)
                run.finish(config, plan, template.name, prepared.report, process, started, _versions(), model_info=info,
                           trainable_params=trainable, total_params=total, result=result, resumed_from=resume_from)
                logger.info("finished: %d steps, train loss %.4f, run dir %s", result.global_step,
                            result.training_loss, run_dir)
            trainer.accelerator.wait_for_everyone()
    except StopRequested:
        # a signal before this process's first step: the checkpoint it resumed from (if any) is still the last
        raise _stopped(run, is_main, resume_from, stop) from None
    except LoraftError as exc:
        # bad data, a model that cannot load, ...: the directory says so, and a corrected rerun may start over
        # (not when start() itself refused: the directory is then another process's)
        if is_main and process and not isinstance(exc, NonFiniteTraining) and run.status() != "finished":
            run.mark("failed", reason=str(exc), failed=time.time())
        raise
    finally:  # the record says finished, stopped or failed before the lock is released
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()
    return run_dir


def _stopped(run: RunDir, is_main: bool, checkpoint: Optional[Path], stop) -> TrainingStopped:
    """Record a graceful stop (rank 0) and return the exception that reports it."""
    step = checkpoint_step(checkpoint) if checkpoint else 0
    if is_main:
        run.mark("stopped", step=step, checkpoint=str(checkpoint) if checkpoint else None,
                 stop_signal=stop.signal_name, stopped_at=local_time())
        logger.info("stopped at step %d (%s)", step, stop.signal_name)
    return TrainingStopped(run.path, step, checkpoint)


def preview_plan(config: RunConfig, measure: bool = False) -> dict:
    """What `loraft plan` prints: the run's plan on this machine, without training or reading weights.

    The model's config comes from its folder or the hub, else (offline) a preset's shipped shape; the parameter
    counts from the model built on the meta device; the speed choices from the cache, or measured now with
    `measure`. Returns {"model", "plan", "parameters", "memory", "autotune"}.
    """
    from loraft import tune
    from loraft.model import meta_counts
    from loraft.objective_table import objective
    from loraft.plan import world_size_from_env
    from loraft.plan_memory import estimate_memory

    model_config, source = read_model_config(config, offline_shape=True)
    plan = plan_run(config, model_config, measure=measure)
    counts = meta_counts(model_config, config.adapter, config.model.trust_remote_code)
    if plan.tuning is not None:
        autotune = f"measured in {plan.tuning['seconds']} s (cached): " + ", ".join(
            f"{key} {value}" for key, value in plan.tuning["choice"].items())
    elif not tune.autotune_enabled(config):
        autotune = "off: the static defaults"
    elif config.train.micro_batch_tokens != "auto" and objective(config.train.objective).loss == "loraft":
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
