"""Preference tuning (DPO, KTO, ORPO): TRL's trainers, under the run directory's guarantees.

TRL owns the losses, the reference log-probabilities, the collators and the reward metrics; loraft adds what any
of its runs has (loraft.trainer.RunGuarantees: atomic checkpoints, the non-finite stop) and hands TRL data it has
already tokenized with the run's template and SFT's masks (loraft.preference). DPOTrainer and KTOTrainer are
TRL's stable trainers (`trl.trainer`); ORPOTrainer is in `trl.experimental` upstream.

The reference model is never a second copy of the base weights. Without `model.adapter_from`, TRL wraps the base
itself (peft_config) and computes the reference with the adapter disabled. With it, the policy continues the SFT
run's adapter and TRL keeps a frozen copy of that adapter, named "ref", beside it on the same base (its
PeftModel branch); "ref" is never saved: a checkpoint and the final adapter hold the trained adapter only.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from loraft.config import RunConfig
from loraft.errors import ConfigError
from loraft.trainer import RunGuarantees, build_training_arguments

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a pretrained adapter (trl/trainer/dpo_trainer.py)


@contextlib.contextmanager
def trained_adapter_only(model):
    """Saves inside write the trained adapter only: PeftModel.save_pretrained writes every adapter it holds,
    TRL's frozen reference copy included, unless told which (Trainer's checkpoint save does not tell it)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or REFERENCE_ADAPTER not in configs:
        yield
        return
    trained = [name for name in configs if name != REFERENCE_ADAPTER]
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=trained)
    try:
        yield
    finally:
        del model.save_pretrained  # the class's method again


class _SavesTrainedAdapter:
    """Checkpoints (Trainer._save) hold the trained adapter, not TRL's reference copy."""

    def _save(self, output_dir=None, state_dict=None):
        with trained_adapter_only(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)


def _trainer_classes():
    """loraft's subclasses of TRL's trainers, built on first use (TRL imports in seconds; `loraft plan` must not)."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class LoraftDPOTrainer(RunGuarantees, _SavesTrainedAdapter, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids/chosen_ids/rejected_ids already, from loraft.preference

    class LoraftKTOTrainer(RunGuarantees, _SavesTrainedAdapter, KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # what TRL's _prepare_dataset does after tokenizing: the KL term's mismatched completions, each
            # batch's completions rotated by one (x_1, y_n), (x_2, y_1), ...
            if not self.calculate_KL:
                return dataset

            def add_kl_completion_ids(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                return examples

            return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size,
                               keep_in_memory=True)

    class LoraftORPOTrainer(RunGuarantees, _SavesTrainedAdapter, ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            return feature  # ORPO's columns already, from orpo_columns

    return {"dpo": (LoraftDPOTrainer, DPOConfig), "kto": (LoraftKTOTrainer, KTOConfig),
            "orpo": (LoraftORPOTrainer, ORPOConfig)}


def orpo_columns(dataset):
    """ORPO (TRL's older tokenized layout): prompt, prompt + chosen and prompt + rejected, labels -100 on the prompt."""

    def layout(example):
        prompt = example["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            ids = prompt + example[f"{side}_ids"]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(prompt) + example[f"{side}_ids"]
        return row

    return dataset.map(layout, remove_columns=dataset.column_names, keep_in_memory=True)


def check_objective(config: RunConfig) -> None:
    """Settings a preference objective cannot run with, in one sentence each (before anything loads)."""
    from loraft.errors import require

    objective, train = config.train.objective, config.train
    require(f"train with train.objective={objective}", "preference", "trl")
    if objective == "kto" and train.per_device_train_batch_size < 2 and config.loss_type() == "kto":
        raise ConfigError("train.objective=kto needs train.per_device_train_batch_size >= 2: KTO estimates its KL "
                          "term from the other completions of the batch (got 1)")


def preference_arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool):
    """TRL's config for the objective: loraft's TrainingArguments (build_training_arguments) plus the loss's
    settings; TRL's own defaults that differ from Trainer's (gradient checkpointing and bf16 on, lr 1e-6) are
    replaced by the run's plan and config, as for SFT."""
    _, arguments_class = _trainer_classes()[config.train.objective]
    preference = config.preference
    extra = dict(beta=preference.beta, max_length=config.data.max_length, gradient_checkpointing=plan.gradient_checkpointing,
                 disable_dropout=True, dataset_num_proc=None)
    if config.train.objective == "dpo":
        loss_type = config.loss_type()
        extra.update(loss_type=loss_type if isinstance(loss_type, list) else [loss_type],
                     loss_weights=preference.loss_weights, label_smoothing=preference.label_smoothing)
    elif config.train.objective == "kto":
        extra.update(loss_type=config.loss_type(), desirable_weight=preference.desirable_weight,
                     undesirable_weight=preference.undesirable_weight)
    else:  # ORPO's collator pads every column itself; its own settings are the lengths
        extra.update(remove_unused_columns=False, max_completion_length=None,
                     include_num_input_tokens_seen="no")  # its batches have no input_ids to count
    return build_training_arguments(config, plan, run_dir, has_eval, arguments_class=arguments_class, **extra)


def build_preference_trainer(config: RunConfig, plan, args, model, info: dict, tokenizer, prepared, callbacks: list):
    """The TRL trainer of `config.train.objective` on the prepared data.

    Args:
        model: from loraft.model.load_model_for_training (attach=False for DPO/KTO without adapter_from: the base,
            with info["peft_config"] for TRL to wrap).
    """
    from loraft.model import cast_for_plan

    trainer_class, _ = _trainer_classes()[config.train.objective]
    train, evaluation = prepared.train, prepared.eval
    if config.train.objective == "orpo":
        train = orpo_columns(train)
        evaluation = orpo_columns(evaluation) if evaluation is not None else None
    kwargs = {}
    if "peft_config" in info:
        kwargs["peft_config"] = info.pop("peft_config")
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                            processing_class=tokenizer, callbacks=callbacks,
                            nonfinite_patience=config.train.nonfinite_patience, **kwargs)
    if "peft_config" in kwargs:  # TRL wrapped the base: the frozen weights are cast now, as load_model does
        cast_for_plan(trainer.model, config, plan, info)
    return trainer
