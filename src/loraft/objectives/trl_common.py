"""What the preference objectives (dpo, kto, orpo) share: TRL's trainers, under the run directory's guarantees.

TRL owns the losses, the reference log-probabilities, the collators and the reward metrics; loraft mixes
loraft.trainer.RunGuarantees (atomic checkpoints, the non-finite stop) into each trainer and hands it data already
tokenized with the run's template and SFT's masks (loraft.preference). DPOTrainer and KTOTrainer are TRL's stable
trainers (`trl.trainer`); ORPOTrainer is in `trl.experimental` upstream.

The reference model is never a second copy of the base weights. Without `model.adapter_from`, TRL wraps the base
itself (peft_config) and computes the reference with the adapter disabled. With it, the policy continues the SFT
run's adapter and TRL keeps a frozen copy of that adapter, named "ref", beside it on the same base (its PeftModel
branch); "ref" is never saved: checkpoints (AtomicCheckpoints) and the final adapter hold the active adapter only.
"""

from __future__ import annotations

from pathlib import Path

from loraft.config import RunConfig
from loraft.errors import DataError
from loraft.trainer import build_training_arguments


def arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool, arguments_class, **loss_settings):
    """TRL's config for the objective: loraft's TrainingArguments (build_training_arguments) plus the loss's
    settings; TRL's own defaults that differ from Trainer's (gradient checkpointing and bf16 on, lr 1e-6) are
    replaced by the run's plan and config, as for SFT."""
    extra = dict(beta=config.preference.beta, max_length=config.data.max_length,
                 gradient_checkpointing=plan.gradient_checkpointing, disable_dropout=True, dataset_num_proc=None)
    return build_training_arguments(config, plan, run_dir, has_eval, arguments_class=arguments_class,
                                    **{**extra, **loss_settings})


def build(trainer_class, config: RunConfig, plan, args, model, info: dict, tokenizer, train, evaluation,
          callbacks: list):
    """The TRL trainer on the prepared data.

    Args:
        model: from loraft.model.load_model_for_training (attach=False for DPO/KTO without adapter_from: the base,
            with info["peft_config"] for TRL to wrap).
    """
    from loraft.model import cast_for_plan

    kwargs = {}
    if "peft_config" in info:
        kwargs["peft_config"] = info.pop("peft_config")
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                            processing_class=tokenizer, callbacks=callbacks,
                            nonfinite_patience=config.train.nonfinite_patience, **kwargs)
    if "peft_config" in kwargs:  # TRL wrapped the base: the frozen weights are cast now, as load_model does
        cast_for_plan(trainer.model, config, plan, info)
    return trainer


def pairs_only(dataset, path: str, objective: str):
    """The dataset, when it holds chosen/rejected pairs; one sentence naming the file otherwise."""
    if "chosen_ids" not in dataset.column_names:
        raise DataError(path, f"holds unpaired records (completion and label): train.objective={objective} needs "
                        "chosen/rejected pairs; train.objective=kto trains on unpaired records")
    return dataset
