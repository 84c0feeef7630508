"""KTO: unpaired completions with a desirable/undesirable label, against a reference (TRL's KTOTrainer)."""

from __future__ import annotations

from pathlib import Path

from trl import KTOConfig, KTOTrainer

from loraft import preference
from loraft.config import RunConfig
from loraft.errors import ConfigError
from loraft.objectives import trl_common
from loraft.trainer import RunGuarantees


class LoraftKTOTrainer(RunGuarantees, KTOTrainer):
    # TRL has no public way to hand it tokenized columns past its text tokenization: _prepare_dataset is private
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # what TRL's _prepare_dataset does after tokenizing: the KL term's mismatched completions, each batch's
        # completions rotated by one (x_1, y_n), (x_2, y_1), ...
        if not self.calculate_KL:
            return dataset
        return dataset.map(_rotated_completions, batched=True, batch_size=args.per_device_train_batch_size,
                           keep_in_memory=True)


def _rotated_completions(examples: dict) -> dict:
    examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
    return examples


def check(config: RunConfig) -> None:
    if config.train.per_device_train_batch_size < 2 and config.loss_type() == "kto":
        raise ConfigError("train.objective=kto needs train.per_device_train_batch_size >= 2: KTO estimates its KL "
                          "term from the other completions of the batch (got 1)")


def columns(dataset, report: dict, path: str, seed: int):
    """Unpaired completions, or pairs split into a desirable chosen and an undesirable rejected (TRL's
    unpair_preference_dataset), shuffled once with the run's seed: its trainer reads them in order (the KL term
    pairs batch neighbours)."""
    if "chosen_ids" in dataset.column_names:
        from datasets import Dataset

        count = len(dataset)
        dataset = Dataset.from_dict({
            "prompt_ids": list(dataset["prompt_ids"]) * 2,
            "completion_ids": list(dataset["chosen_ids"]) + list(dataset["rejected_ids"]),
            "label": [True] * count + [False] * count,
        })
        report["unpaired_from_pairs"] = count
    return dataset.shuffle(seed=seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)


def prepare(config: RunConfig, tokenizer):
    return preference.prepare(config, tokenizer, columns)


def arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool):
    return trl_common.arguments(config, plan, run_dir, has_eval, KTOConfig, loss_type=config.loss_type(),
                                desirable_weight=config.preference.desirable_weight,
                                undesirable_weight=config.preference.undesirable_weight)


def build_trainer(config: RunConfig, plan, args, model, info: dict, tokenizer, prepared, callbacks: list):
    return trl_common.build(LoraftKTOTrainer, config, plan, args, model, info, tokenizer, prepared.train,
                            prepared.eval, callbacks)
