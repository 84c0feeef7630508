"""ORPO: chosen/rejected pairs, reference-free (TRL's ORPOTrainer, in trl.experimental upstream)."""

from __future__ import annotations

from pathlib import Path

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from loraft import preference
from loraft.config import RunConfig
from loraft.objectives import trl_common
from loraft.trainer import RunGuarantees


class LoraftORPOTrainer(RunGuarantees, ORPOTrainer):
    # TRL has no public way to hand ORPO tokenized rows: tokenize_row is its internal per-row tokenizer
    def tokenize_row(self, feature, model=None):
        return feature  # ORPO's columns already, from orpo_columns


def check(config: RunConfig) -> None:
    """ORPO runs with any valid config."""


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


def columns(dataset, report: dict, path: str, seed: int):
    return trl_common.pairs_only(dataset, path, "orpo")


def prepare(config: RunConfig, tokenizer):
    return preference.prepare(config, tokenizer, columns)


def arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool):
    # ORPO's collator pads every column itself; its own settings are the lengths
    return trl_common.arguments(config, plan, run_dir, has_eval, ORPOConfig, remove_unused_columns=False,
                                max_completion_length=None,
                                include_num_input_tokens_seen="no")  # its batches have no input_ids to count


def build_trainer(config: RunConfig, plan, args, model, info: dict, tokenizer, prepared, callbacks: list):
    evaluation = orpo_columns(prepared.eval) if prepared.eval is not None else None
    return trl_common.build(LoraftORPOTrainer, config, plan, args, model, info, tokenizer,
                            orpo_columns(prepared.train), evaluation, callbacks)
