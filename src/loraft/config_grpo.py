"""The run config's `grpo` section (train.objective grpo): the rewards, the sampling and TRL's GRPO loss settings.
Import it from loraft.config, with the rest of the schema."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from loraft.config_section import Section

# TRL 1.16's GRPOConfig.loss_type values (trl/trainer/grpo_config.py) that need no extra setting
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")
REWARD_TYPES = ("exact_match", "number", "regex", "length", "function")


class RewardConfig(Section):
    """One reward: a built-in check of the completion, or a user function, with its weight in the sum."""

    type: Literal[REWARD_TYPES] = Field(
        description="exact_match: 1 when the completion, stripped, equals the record's `field` (stripped), else 0; "
        "number: 1 when the last number in the completion equals the number in the record's `field`, else 0; "
        "regex: 1 when the stripped completion matches `pattern` whole, else 0; length: 0 up to `max_tokens` "
        "completion tokens, then -1 for each further max_tokens; function: the user's `function`, called as TRL "
        "calls a reward function.",
    )
    weight: float = Field(1.0, description="The reward's weight in the weighted sum GRPO normalises per group.")
    field: str = Field("answer", description="exact_match and number: the record field holding the expected answer.")
    pattern: Optional[str] = Field(None, description="regex: the pattern the whole stripped completion must match "
                                   "(Python re, DOTALL).")
    max_tokens: Optional[int] = Field(None, gt=0, description="length: completions up to this many tokens cost "
                                      "nothing.")
    function: Optional[str] = Field(
        None,
        description="function: `module:function` importable from the working directory, called with prompts=, "
        "completions=, completion_ids= and each record field as a list (TRL's reward-function signature); it returns "
        "one float (or None) per completion. The UI offers built-ins only.",
    )
    name: Optional[str] = Field(None, description="The reward's name in metrics and completions.jsonl (default: "
                                "its type, or the function's name).")

    @model_validator(mode="after")
    def _settings_fit_the_type(self) -> "RewardConfig":
        needed = {"regex": "pattern", "length": "max_tokens", "function": "function"}.get(self.type)
        if needed and getattr(self, needed) is None:
            raise ValueError(f"a {self.type} reward needs `{needed}`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        if self.function is not None:
            module, _, attribute = self.function.partition(":")
            if not module or not attribute:
                raise ValueError(f"function {self.function!r} must be written module:function")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.type == "function":
            return self.function.partition(":")[2]
        return self.type


class GrpoConfig(Section):
    """GRPO (train.objective grpo) on TRL's GRPOTrainer: each prompt is sampled num_generations times, every
    completion scored by the rewards, and the policy moved toward the completions that beat their group's mean."""

    rewards: list[RewardConfig] = Field(
        default_factory=list,
        description="The rewards, summed with their weights (at least one for train.objective=grpo); e.g. "
        "[{type: number, field: answer}, {type: regex, pattern: '\\d+', weight: 0.2}].",
    )
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (TRL's default 8); the "
                                 "step's prompts x this must divide into the step's samples.")
    max_completion_length: int = Field(256, gt=0, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass of the completions.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0 = off).")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the base (the adapter switched off); TRL's "
                        "default 0 computes no reference.")
    epsilon: float = Field(0.2, gt=0, description="The policy ratio's clipping range.")
    loss_type: Literal[GRPO_LOSS_TYPES] = Field("dapo", description="TRL's loss aggregation: dapo (TRL's default), "
                                                 "grpo, dr_grpo, bnpo, cispo or sapo.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide the advantages by the rewards' spread in the group (TRL's default), the "
        "batch, or not at all (Dr. GRPO).")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_completion_length "
                                             "out of the loss (DAPO's advice).")
    completions_logged: int = Field(8, ge=0, description="Completions written to completions.jsonl (with their "
                                    "prompt and rewards) at each logging step; 0 = none.")

    @field_validator("rewards")
    @classmethod
    def _unique_names(cls, rewards: list[RewardConfig]) -> list[RewardConfig]:
        names = [reward.label for reward in rewards]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise ValueError(f"two rewards are named {doubled[0]!r}: give one a `name`")
        return rewards
