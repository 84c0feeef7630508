"""DPO: chosen/rejected pairs against a frozen reference (TRL's DPOTrainer; shared parts in trl_common)."""

from __future__ import annotations

from pathlib import Path

from trl import DPOConfig, DPOTrainer

from loraft import preference
from loraft.config import RunConfig
from loraft.objectives import trl_common
from loraft.trainer import RunGuarantees


class LoraftDPOTrainer(RunGuarantees, DPOTrainer):
    # TRL has no public way to hand it tokenized columns past its text tokenization: _prepare_dataset is private
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_ids/chosen_ids/rejected_ids already, from loraft.preference


def check(config: RunConfig) -> None:
    """DPO runs with any valid config (config checks the loss types)."""


def columns(dataset, report: dict, path: str, seed: int):
    return trl_common.pairs_only(dataset, path, "dpo")


def prepare(config: RunConfig, tokenizer):
    return preference.prepare(config, tokenizer, columns)


def arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool):
    loss_type = config.loss_type()
    return trl_common.arguments(config, plan, run_dir, has_eval, DPOConfig,
                                loss_type=loss_type if isinstance(loss_type, list) else [loss_type],
                                loss_weights=config.preference.loss_weights,
                                label_smoothing=config.preference.label_smoothing)


def build_trainer(config: RunConfig, plan, args, model, info: dict, tokenizer, prepared, callbacks: list):
    return trl_common.build(LoraftDPOTrainer, config, plan, args, model, info, tokenizer, prepared.train,
                            prepared.eval, callbacks)
