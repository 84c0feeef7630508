"""The run config's schema: one typed section per stage (model, data, preference (loraft.config_preference),
grpo (loraft.config_grpo), adapter, train, generation) under RunConfig, a one-line description on every field, and the checks of single values
and across sections. Import these names from loraft.config, which loads, overrides, saves and describes them.

Defaults reproduce the reference recipe (Langboat/bloom-1b4-zh, alpaca_data_zh, human_assistant
template, max_length 256, LoRA on `.*\\.1.*query_key_value` with `word_embeddings` saved, 1 epoch,
batch 1, grad-accum 8, logging every 10 steps). How it is computed defaults to the fast path (bf16 where the
hardware has it, length-grouped micro-batches, supervised-only loss); `train.precision=fp32
train.sampling=random` computes the reference's function step for step (see docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from loraft.config_grpo import GrpoConfig, RewardConfig
from loraft.config_preference import DPO_LOSS_TYPES, KTO_LOSS_TYPES, PreferenceConfig
from loraft.config_section import Section as _Section
from loraft.objective_table import OBJECTIVE_NAMES

__all__ = ["DPO_LOSS_TYPES", "KTO_LOSS_TYPES", "OBJECTIVES", "AdapterConfig", "DataConfig", "GenerationConfig",
           "GrpoConfig", "ModelConfig", "PreferenceConfig", "RewardConfig", "RunConfig", "TrainConfig"]


class ModelConfig(_Section):
    name_or_path: str = Field(
        "Langboat/bloom-1b4-zh", description="Base model: a hub id or a local directory with config and weights."
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Dtype the frozen base weights are loaded in; auto follows train.precision."
    )
    device: str = Field("auto", description="Device for training/inference: auto, cpu, cuda, cuda:N or mps.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repository.")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none",
        description="QLoRA: store the base's linear layers by bitsandbytes in 4-bit NF4 (double-quantized, computing "
        "in the run's precision) or 8 bits while the adapter trains; none = as loaded. Needs the qlora extra.",
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    adapter_from: Optional[str] = Field(
        None,
        description="A finished loraft run directory (an SFT run) whose adapter this run continues training, on the "
        "same base model; its adapter settings replace this config's adapter section. Preference objectives use its "
        "frozen copy as the reference model. None = a fresh adapter (the reference is then the base, adapter off).",
    )
    attn_implementation: Optional[str] = Field(
        None,
        description="Attention implementation (eager, sdpa, flash_attention_2); None = sdpa where available "
        "(BLOOM: loraft's SDPA with alibi and one-kernel GELU), eager = the library's code.",
    )


class DataConfig(_Section):
    path: str = Field(
        "alpaca_data_zh",
        description="Training data: a save_to_disk directory, a .json/.jsonl/.csv/.parquet file, or a hub dataset id.",
    )
    format: Literal["auto", "alpaca", "messages", "sharegpt", "preference_alpaca", "preference_messages",
                    "preference_sharegpt", "unpaired_alpaca", "unpaired_messages", "unpaired_sharegpt"] = Field(
        "auto",
        description="Record format; auto detects alpaca (instruction/input/output), messages or sharegpt, and "
        "preference data: chosen + rejected make preference_* (DPO pairs), completion + label (a boolean) make "
        "unpaired_* (KTO); the suffix says where the prompt is: alpaca (instruction/input, optional system and "
        "history), messages (prompt: a string or a list of {role, content}) or sharegpt (conversations).",
    )
    template: str = Field(
        "auto",
        description="Prompt template (see `loraft templates`): auto = the tokenizer's own chat_template when it has "
        "one (instruct models; loss on assistant turns and their end-of-turn token), else human_assistant (the "
        "reference recipe's; bloom-1b4-zh has no chat_template); model = the tokenizer's own, required; or a name.",
    )
    max_length: int = Field(
        256,
        description="Truncate each tokenized sample to this many tokens (as the reference); preference data: the "
        "prompt plus each completion, keeping the start (TRL's max_length).",
    )
    split: Optional[str] = Field(None, description="Split to use when the source holds several (e.g. train).")
    instruction_field: str = Field("instruction", description="Alpaca column holding the instruction.")
    input_field: str = Field("input", description="Alpaca column holding the optional input (may be absent).")
    output_field: str = Field("output", description="Alpaca column holding the response.")
    system_field: str = Field("system", description="Optional column holding a per-record system prompt.")
    history_field: str = Field("history", description="Optional alpaca column with earlier [user, assistant] turns.")
    messages_field: str = Field("messages", description="Column holding a list of {role, content} messages.")
    system_prompt: Optional[str] = Field(None, description="System prompt added to records that have none.")
    allow_empty_responses: bool = Field(
        False, description="Train even when every response is empty (the model would only learn to stop at once).",
    )
    eval_path: Optional[str] = Field(None, description="Held-out data for evaluation during training (same formats).")
    eval_fraction: float = Field(0.0, description="Fraction of the training records held out for evaluation (0 = none).")
    limit: Optional[int] = Field(None, description="Use only the first N records (quick runs).")
    num_proc: Optional[int] = Field(None, description="Tokenization worker processes; None = up to the CPU count.")
    cache_dir: Optional[str] = Field(
        None, description="Where tokenized datasets are cached; None = $LORAFT_HOME/tokenized."
    )

    @field_validator("max_length")
    @classmethod
    def _positive_length(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"must be >= 2 (got {value})")
        return value

    @field_validator("eval_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must be in [0, 1) (got {value})")
        return value


class AdapterConfig(_Section):
    method: Literal["lora", "prompt_tuning", "prefix_tuning", "ia3"] = Field(
        "lora", description="peft method: lora, prompt_tuning, prefix_tuning or ia3."
    )
    r: int = Field(8, description="LoRA rank.")
    alpha: float = Field(8, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, description="LoRA dropout probability.")
    target_modules: Optional[Union[str, list[str]]] = Field(
        r".*\.1.*query_key_value",
        description="Modules to adapt: a regex matched against full module names, or a list of name suffixes.",
    )
    modules_to_save: Optional[list[str]] = Field(
        ["word_embeddings"], description="Modules trained in full and saved with the adapter."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    num_virtual_tokens: int = Field(20, description="Virtual tokens for prompt/prefix tuning.")
    prompt_tuning_init: Literal["random", "text"] = Field("random", description="Prompt tuning initialisation.")
    prompt_tuning_init_text: Optional[str] = Field(None, description="Text used to initialise prompt tuning (init=text).")
    prefix_projection: bool = Field(False, description="Prefix tuning: reparametrise the prefix through an MLP.")
    feedforward_modules: Optional[Union[str, list[str]]] = Field(
        None, description="IA3: which target_modules are feed-forward (scaled on their input)."
    )

    @field_validator("r", "num_virtual_tokens")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be > 0 (got {value})")
        return value

    @field_validator("dropout")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must be in [0, 1) (got {value})")
        return value


OBJECTIVES = OBJECTIVE_NAMES  # the objective table's names (loraft.objectives)


class TrainConfig(_Section):
    objective: Literal[OBJECTIVE_NAMES] = Field(
        "sft",
        description="What is learnt: sft (supervised fine-tuning on instruction data, the reference recipe), or "
        "preference tuning on preference data with TRL's trainers: dpo (chosen/rejected pairs, against a frozen "
        "reference), kto (unpaired completions with a boolean label, against a reference) or orpo (pairs, "
        "reference-free; TRL experimental), see the preference section; or grpo (reinforcement learning on "
        "prompt-only records with checkable rewards, TRL's GRPOTrainer), see the grpo section.",
    )
    num_train_epochs: float = Field(1.0, description="Epochs over the training data.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = run the epochs).")
    per_device_train_batch_size: int = Field(1, description="Samples per micro-batch on each device.")
    gradient_accumulation_steps: int = Field(8, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(5e-5, description="Peak learning rate (transformers' default, as the reference).")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    warmup_steps: float = Field(
        0, description="Learning-rate warmup: a number of steps, or a fraction (< 1) of all steps."
    )
    lr_scheduler_type: str = Field("linear", description="transformers learning-rate schedule name.")
    optim: str = Field(
        "adamw_torch_fused",
        description="transformers optimizer name (adamw_torch_fused: Trainer's own default, one fused kernel per step).",
    )
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Compute precision: auto (CUDA: bf16, else fp16; CPU: bf16 only where the CPU has bf16 "
        "instructions and a cached matmul probe finds bf16 at least 1.5x faster than fp32, else fp32), bf16, fp16, "
        "or fp32 (the reference's numerics: the parity mode).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    sampling: Literal["length_grouped", "random", "sequential", "group_by_length"] = Field(
        "length_grouped",
        description="Sample order: length_grouped (shuffled micro-batches of similar-length samples), random (the "
        "reference's order: same samples in each optimizer step), sequential, or group_by_length (Trainer's).",
    )
    micro_batch_tokens: Union[int, Literal["auto"]] = Field(
        "auto",
        description="Collate each optimizer step's batch x grad-accum samples as one batch and run forward/backward "
        "in sub-batches of at most this many padded tokens, longest together (same step and loss); auto = sized "
        "from the precision so activation memory stays within the reference's (fp32: data.max_length, at least 256; bf16/fp16: "
        "4 x data.max_length, at most 1024 unless max_length is larger); 0 = the configured batch and accumulation.",
    )
    packing: bool = Field(
        False,
        description="Lay each optimizer step's samples out packed into rows of up to micro_batch_tokens tokens instead "
        "of padded: the same samples and loss, no padding computed, no attention across samples (position_ids, or "
        "BLOOM's segment mask); architectures the fast-path registry cannot pack run padded.",
    )
    supervised_loss: bool = Field(
        True, description="Run lm_head and the loss only where labels are supervised, in chunks (same loss)."
    )
    autotune: bool = Field(
        True,
        description="Choose the sub-batch size, attention, fused loss and optimizer from a short measurement at the "
        "model's real width on this machine (once, cached; the reference's own path is a candidate; for TRL's "
        "objectives only the attention); false = the static defaults. $LORAFT_AUTOTUNE=0 also turns it off.",
    )
    nonfinite_patience: int = Field(
        0, ge=0,
        description="Optimizer steps in a row with a NaN/inf loss or gradient norm before training stops with "
        "status failed (0 = stop at the first); a tolerated step's update uses zeroed gradients.",
    )
    retention: Literal["auto", "kl", "off"] = Field(
        "auto",
        description="The retention guard (loraft.retention_guard): kl adds, every retention_every optimizer steps, "
        "retention_weight x the KL divergence from the base (the adapter switched off) to the run on a few general "
        "conversations the project ships, so a narrow fine-tune keeps the model's general answers; auto = kl for sft "
        "with a LoRA-family adapter on an unquantized base, else off; off = the plain objective (the reference "
        "recipe's preset).",
    )
    retention_weight: float = Field(0.3, gt=0, description="Weight of the retention guard's KL term (0.3: chosen "
                                    "on a real model, docs/benchmarks.md, Retention).")
    retention_rows: int = Field(2, gt=0, description="General conversations the retention guard scores per guarded "
                                "step (a fixed seeded rotation through the shipped set).")
    retention_every: Union[Literal["auto"], int] = Field(
        "auto", description="The retention guard runs every N optimizer steps with N x its weight (the same pull on "
        "average at 1/N of the cost); auto = the fewest that keep its tokens within 10% of a step's task tokens, from "
        "the prepared data, at most 4 (train.log says which).")
    logging_steps: int = Field(10, description="Log loss every N optimizer steps (as the reference).")
    save_steps: int = Field(
        500, description="Checkpoint every N optimizer steps (the reference's save_steps=1 writes 380 MB a step)."
    )
    save_total_limit: Optional[int] = Field(3, description="Keep at most this many checkpoints.")
    eval_steps: Optional[int] = Field(None, description="Evaluate every N steps when eval data exists (None = per epoch).")
    seed: int = Field(42, description="Random seed for data order and adapter initialisation.")
    dataloader_num_workers: int = Field(0, description="DataLoader worker processes.")
    report_to: list[str] = Field([], description="transformers integrations to report to (e.g. tensorboard, wandb).")

    @field_validator("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be > 0 (got {value})")
        return value

    @field_validator("retention", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        # YAML 1.1 reads a bare `off` / `on` as a boolean: `train.retention: off` means what it says
        return {False: "off", True: "kl"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("retention_every")
    @classmethod
    def _every(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError(f"must be auto or > 0 (got {value})")
        return value

    @field_validator("micro_batch_tokens")
    @classmethod
    def _not_negative(cls, value):
        if value != "auto" and value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value

    @field_validator("learning_rate")
    @classmethod
    def _positive_lr(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be > 0 (got {value})")
        return value


class GenerationConfig(_Section):
    """Sampling settings. The one place their ranges are checked: a run's saved `generation.*`, CLI flags and
    server requests are all resolved through loraft.generate.resolve_generation into this schema."""

    max_new_tokens: int = Field(256, gt=0, description="Most tokens generated per answer.")
    min_new_tokens: int = Field(0, ge=0, description="Fewest tokens generated before an end token may stop the "
                                "answer (0 = off).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature, 0 to 2 (0 = greedy).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling probability mass, in (0, 1].")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0 = off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty for repeated tokens (1 = off).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Weights dtype for chat/generate: auto = what train.precision=auto picks on this machine "
        "(bf16 halves the bytes decoding reads per token), else fp32; fp32 = the trained function exactly.",
    )


class RunConfig(_Section):
    output_dir: str = Field("runs/lora", description="Run directory: adapter, tokenizer, config, metrics, plots.")
    overwrite: bool = Field(False, description="Allow replacing a finished run in output_dir.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data and template.")
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Preference tuning (DPO/KTO/ORPO): the loss and the length limits of preference data."
    )
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="GRPO (train.objective=grpo): the rewards, the "
                             "sampling and the loss.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="peft adapter.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Trainer settings.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Default sampling settings.")

    @model_validator(mode="after")
    def _prompt_leaves_room(self) -> "RunConfig":
        limit = self.preference.max_prompt_length
        if limit is not None and limit >= self.data.max_length:
            raise ValueError(f"preference.max_prompt_length must be < data.max_length, to leave room for the "
                             f"completion (got {limit} >= {self.data.max_length})")
        return self

    @model_validator(mode="after")
    def _retention_guard_applies(self) -> "RunConfig":
        if self.train.retention != "kl":
            return self
        if self.train.objective != "sft":
            raise ValueError(f"train.retention=kl guards sft runs; train.objective={self.train.objective} keeps its "
                             "own reference (leave train.retention auto or off)")
        if self.model.quantization != "none":
            raise ValueError(f"train.retention=kl does not run on a quantized base yet (model.quantization="
                             f"{self.model.quantization}: bitsandbytes' 4-bit backward fails in the guard's forward); "
                             "leave it auto or off")
        if self.adapter.method in ("prompt_tuning", "prefix_tuning"):
            raise ValueError(f"train.retention=kl needs a LoRA-family adapter (its base is the adapter switched "
                             f"off inside the model); adapter.method={self.adapter.method} (leave it auto or off)")
        return self

    @model_validator(mode="after")
    def _grpo_has_rewards(self) -> "RunConfig":
        if self.train.objective == "grpo" and not self.grpo.rewards:
            raise ValueError("train.objective=grpo needs at least one reward in grpo.rewards, e.g. "
                             "grpo.rewards=[{type: exact_match, field: answer}]")
        return self

    @model_validator(mode="after")
    def _loss_type_fits(self) -> "RunConfig":
        objective, loss_type = self.train.objective, self.preference.loss_type
        weights = self.preference.loss_weights
        if weights is not None and (objective != "dpo" or not isinstance(loss_type, list)):
            raise ValueError("preference.loss_weights weighs a list of DPO loss types (train.objective=dpo, "
                             "preference.loss_type: [..]); leave it null otherwise")
        if loss_type is None:
            return self
        allowed = {"dpo": DPO_LOSS_TYPES, "kto": KTO_LOSS_TYPES}.get(objective, ())
        if isinstance(loss_type, list):
            if objective != "dpo" or not loss_type:
                raise ValueError(f"preference.loss_type: a list of losses is DPO's (train.objective=dpo); "
                                 f"train.objective={objective} takes one name")
            if weights is not None and len(weights) != len(loss_type):
                raise ValueError(f"preference.loss_weights has {len(weights)} weights for {len(loss_type)} loss "
                                 "types")
        for name in loss_type if isinstance(loss_type, list) else [loss_type]:
            if name in allowed:
                continue
            if not allowed:
                raise ValueError(f"preference.loss_type {name!r} does not apply to train.objective={objective} "
                                 "(it has one loss); leave it null")
            raise ValueError(f"preference.loss_type {name!r} is not one of train.objective={objective}'s: "
                             + ", ".join(allowed))
        return self

    def loss_type(self) -> Optional[Union[str, list[str]]]:
        """The preference loss in use: the configured one (or list, DPO) or the objective's default (None for sft
        and orpo)."""
        return self.preference.loss_type or {"dpo": "sigmoid", "kto": "kto"}.get(self.train.objective)
