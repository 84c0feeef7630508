"""The run config's `preference` section (train.objective dpo, kto or orpo), and the loss types TRL names. Import it
from loraft.config, with the rest of the schema."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import Field, field_validator

from loraft.config_section import Section

# TRL 1.16's DPOConfig.loss_type values (trl/trainer/dpo_config.py) and KTOConfig's
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class PreferenceConfig(Section):
    """Preference tuning (train.objective dpo, kto or orpo): the loss's settings, passed to TRL's trainer, and the
    length limits of preference data (preference_* and unpaired_* formats), on top of data.max_length.

    TRL 1.16 has only max_length (prompt + completion, cut keeping the start); both limits here default to off, so
    loraft cuts exactly where TRL's collator would. They are TRL 0.x's max_prompt_length / max_completion_length."""

    beta: float = Field(
        0.1, gt=0,
        description="How far the policy may move from the reference (DPO/KTO), or the odds-ratio weight (ORPO, "
        "TRL's lambda); TRL's default 0.1. For the ipo loss, the regularisation tau.",
    )
    loss_type: Optional[Union[str, list[str]]] = Field(
        None,
        description="The loss variant, as TRL names it: dpo: sigmoid (the DPO paper's), hinge, ipo, exo_pair, "
        "nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft or "
        "sigmoid_norm, or a list of them summed with loss_weights (e.g. [sigmoid, sft]: DPO plus the chosen "
        "answers' NLL, TRL's RPO); kto: kto or apo_zero_unpaired; None = the objective's default (sigmoid, kto); "
        "orpo has one.",
    )
    loss_weights: Optional[list[float]] = Field(
        None, description="DPO with a list of loss types: the weight of each (None = 1.0 each), as TRL's loss_weights."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5,
        description="DPO robust/exo_pair losses: the probability that a preference label is flipped (TRL's "
        "label_smoothing).",
    )
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the losses of desirable (label true) "
                                    "completions, to balance unequal counts.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the losses of undesirable (label "
                                      "false) completions.")

    max_prompt_length: Optional[int] = Field(
        None,
        description="Cut a longer prompt to its last N tokens (the turn nearest the answer stays), so it leaves "
        "room for the completion; None = prompts stay whole, as TRL 1.16 keeps them, and a prompt that fills "
        "data.max_length is refused.",
    )
    max_completion_length: Optional[int] = Field(
        None,
        description="Cut each completion (chosen, rejected, or a KTO completion) to its first N tokens; None = "
        "what data.max_length leaves after the prompt, as in TRL 1.16.",
    )

    @field_validator("max_prompt_length", "max_completion_length")
    @classmethod
    def _positive_or_off(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value <= 0:
            raise ValueError(f"must be > 0 or null (got {value})")
        return value
