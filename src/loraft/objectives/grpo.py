"""GRPO: prompt-only records, completions sampled from the policy and scored by checkable rewards (TRL's
GRPOTrainer; the records in loraft.prompts, the rewards in loraft.rewards).

A step's samples are completions, as in TRL: train.per_device_train_batch_size x gradient_accumulation_steps x
processes completions, grpo.num_generations per prompt, generated once at the start of each optimizer step with
Hugging Face `generate` (KV cache, the whole step's prompts in one batch) on the policy itself, with the library's
default attention where the autotune picked eager for the update. Without
model.adapter_from TRL wraps the base with the run's LoRA; with grpo.beta > 0 its reference is the adapter switched
off (no second copy of the base). The trainer carries loraft.trainer.RunGuarantees (atomic checkpoints, the
non-finite stop), and a checkpoint holds the random state the next step samples with, so a resumed run samples
what the uninterrupted one did.

What the run shows: TRL's metrics (reward, reward_std, rewards/<name>/mean and /std, completions/mean_length,
clip ratios, kl when beta > 0) in metrics.jsonl, and completions.jsonl: at each logging step, grpo.completions_logged
of the step's completions with their prompt, each reward and the advantage.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Optional

from trl import GRPOConfig, GRPOTrainer

from loraft import prompts
from loraft.config import RunConfig
from loraft.errors import ConfigError
from loraft.rewards import build_rewards
from loraft.rundir import RunDir
from loraft.trainer import RunGuarantees, build_training_arguments
from loraft.weights import HeadCastOnce


class AttentionFor:
    """Within the block, the model computes attention with `implementation` (transformers' set_attn_implementation),
    then goes back to what it had; None changes nothing."""

    def __init__(self, model, implementation: Optional[str]):
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.implementation = implementation
        self.previous: Optional[str] = None

    def __enter__(self) -> "AttentionFor":
        current = self.model.config._attn_implementation
        if self.implementation and self.implementation != current:
            self.previous = current
            self.model.set_attn_implementation(self.implementation)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            self.model.set_attn_implementation(self.previous)


class LoraftGRPOTrainer(RunGuarantees, GRPOTrainer):
    """TRL's GRPOTrainer on prompts loraft tokenized, writing completions.jsonl."""

    def __init__(self, *args, prompt_ids: dict, completions_file: Optional[Path] = None, completions_logged: int = 0,
                 generation_attention: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loraft_prompt_ids = prompt_ids
        # the autotune chose eager for the update's backward; decoding one token a row keeps the library's default
        self.generation_attention = generation_attention
        self.completions_file = completions_file
        self.completions_logged = completions_logged
        self.generation_seconds = 0.0  # since the last log: TRL generates through the policy's own generate
        generate = self.model.generate

        # Generation runs outside the step's autocast (Trainer enters it for the loss only); under a bf16 or fp16
        # plan the frozen weights are stored in that dtype (cast_for_plan), so generation needs the same autocast,
        # with a tied fp32 head cast once per call rather than once per token (HeadCastOnce: the same values)
        @functools.wraps(generate)
        def timed_generate(*args, **kwargs):
            started = time.perf_counter()
            try:
                with self.accelerator.autocast(), HeadCastOnce(self.model), \
                        AttentionFor(self.model, self.generation_attention):
                    return generate(*args, **kwargs)
            finally:
                self.generation_seconds += time.perf_counter() - started

        self.model.generate = timed_generate

    # TRL has no public way to take prompts already tokenized: _tokenize_prompts is its private tokenizer call
    def _tokenize_prompts(self, prompts_text: list):
        return [self.loraft_prompt_ids[text] for text in prompts_text], None, {}

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        training = self.model.training
        if training and "loss" in logs:
            logs["generation_seconds"] = round(self.generation_seconds / max(self.args.logging_steps, 1), 4)
            self.generation_seconds = 0.0
        super().log(logs, start_time)
        if training and "loss" in logs and self.completions_file and self.completions_logged \
                and self.state.is_world_process_zero:
            self._write_completions()

    def _write_completions(self) -> None:
        # TRL has no public hook that hands out the sampled completions: _logs is where it keeps the last batch's
        logged = self._logs
        count = min(self.completions_logged, len(logged["prompt"]))

        def number(value):  # a reward that did not apply (None, NaN in TRL's table) is null, as JSON has no NaN
            return value if isinstance(value, (int, float)) and math.isfinite(value) else None

        with self.completions_file.open("a", encoding="utf-8") as handle:
            for index in range(len(logged["prompt"]) - count, len(logged["prompt"])):
                row = {"step": self.state.global_step, "prompt": logged["prompt"][index],
                       "completion": logged["completion"][index],
                       "rewards": {name: number(values[index]) for name, values in logged["rewards"].items()},
                       "advantage": number(logged["advantages"][index])}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def check(config: RunConfig) -> None:
    """Settings GRPO cannot run with, one sentence each."""
    if config.adapter.method in ("prompt_tuning", "prefix_tuning"):
        raise ConfigError(f"train.objective=grpo trains a LoRA-family adapter; adapter.method={config.adapter.method} "
                          "is not supported by TRL's GRPOTrainer here")


def prepare(config: RunConfig, tokenizer):
    return prompts.prepare(config, tokenizer)


def generations_fit(config: RunConfig, world_size: int) -> None:
    """The step's completions must hold whole groups of grpo.num_generations (TRL's rule), said in loraft's keys."""
    train, generations = config.train, config.grpo.num_generations
    completions = train.per_device_train_batch_size * train.gradient_accumulation_steps * world_size
    if completions % generations:
        raise ConfigError(f"train.objective=grpo: a step samples train.per_device_train_batch_size x "
                          f"gradient_accumulation_steps x processes = {completions} completions, which must be a "
                          f"multiple of grpo.num_generations ({generations}): each prompt gets a whole group")


def arguments(config: RunConfig, plan, run_dir: Path, has_eval: bool):
    generations_fit(config, plan.world_size)
    grpo = config.grpo
    return build_training_arguments(
        config, plan, run_dir, has_eval, arguments_class=GRPOConfig,
        num_generations=grpo.num_generations, max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature, top_p=grpo.top_p, top_k=grpo.top_k, beta=grpo.beta, epsilon=grpo.epsilon,
        loss_type=grpo.loss_type, scale_rewards=grpo.scale_rewards,
        mask_truncated_completions=grpo.mask_truncated_completions,
        gradient_checkpointing=plan.gradient_checkpointing, remove_unused_columns=False, disable_dropout=True,
        log_completions=False,  # TRL's table needs pandas and rich; loraft writes completions.jsonl
        shuffle_dataset=plan.sampler != "sequential",
        include_num_input_tokens_seen="no",  # GRPO's batches are prompts: Trainer cannot count their tokens
    )


def generation_attention(config: RunConfig, plan, model) -> Optional[str]:
    """The attention generation runs with: the library's default ("sdpa") where the autotune picked eager for the
    update (it times forward and backward over TRL's batch; decoding is forward only, one token a row); None (the
    model's own) otherwise, a user's model.attn_implementation included."""
    if plan.attention != "eager" or config.model.attn_implementation or not getattr(model, "_supports_sdpa", False):
        return None
    return "sdpa"


def build_trainer(config: RunConfig, plan, args, model, info: dict, tokenizer, prepared, callbacks: list):
    from loraft.model import cast_for_plan

    reward_funcs, weights = build_rewards(config.grpo.rewards)
    args.reward_weights = weights
    kwargs = {"peft_config": info.pop("peft_config")} if "peft_config" in info else {}
    trainer = LoraftGRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=prepared.train,
        eval_dataset=prepared.eval, processing_class=tokenizer, callbacks=callbacks,
        nonfinite_patience=config.train.nonfinite_patience,
        prompt_ids=prompts.prompt_lookup(prepared.train, prepared.eval),
        completions_file=RunDir(config.output_dir).completions_file, completions_logged=config.grpo.completions_logged,
        generation_attention=generation_attention(config, plan, model), **kwargs)
    if "peft_config" in kwargs:  # TRL wrapped the base: the frozen weights are cast now, as load_model does
        cast_for_plan(trainer.model, config, plan, info)
    return trainer

