"""Every machine- and model-dependent decision of a run, made once, each with its reason.

`make_plan` is a pure function of the config, this machine's capabilities (loraft.precision.machine_capabilities),
the base model's config (its architecture, read without weights) and the number of processes, plus, when the
speed choices were measured (loraft.tune), that measurement. It returns a frozen `Plan`: the device, the compute
precision, how the frozen weights are stored, the sub-batch size, the sampler, whether the fused loss and packing
apply, the family's speed path and attention, the optimizer, gradient checkpointing, the per-process batch, and
the dtype chat/generate/serve would use here. Training arguments, the trainer, train.log (`describe`),
loraft_run.json (`to_dict`) and `loraft plan` all read it; nothing re-derives a decision.

What "trains" needs of a family: nothing (any causal LM trains at transformers' speed). What "trains fast" needs:
one entry in loraft.fastpaths.REGISTRY with its test shape.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from loraft import gguf_base, rollout_cost
from loraft.batching import micro_batch_budget, plan_micro_batches
from loraft.config import RunConfig
from loraft.errors import ConfigError
from loraft.fastpaths import fast_path, patches_on_load
from loraft.objective_table import objective
from loraft.precision import Capabilities, choose_inference_dtype, choose_precision
from loraft.retention_guard import describe as describe_guard

PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")
FAST_DROPOUT = "loraft's 16-bit masks"  # the plan's lora_dropout when loraft.fastpaths.dropout replaces nn.Dropout


@dataclass(frozen=True)
class Plan:
    """What a run will do on this machine; `reasons[name]` says why for each decision."""

    device: str
    precision: str
    weights: str
    micro_batch_tokens: int
    samples_per_batch: int  # collated per process per forward/backward round (the step's samples, or the config's)
    accumulation: int
    sampler: str
    fused_loss: bool
    packing: bool
    model_type: str
    speed_path: str
    attention: Optional[str]  # passed to from_pretrained; None = the library's default (or the family's patch)
    attention_patch: bool  # the family's own attention replaces the default (loraft.fastpaths)
    optimizer: str
    gradient_checkpointing: bool
    world_size: int
    generation_dtype: str
    retention: str = "off"  # the retention guard (loraft.retention_guard.describe)
    lora_dropout: str = "none"  # FAST_DROPOUT: loraft.fastpaths.dropout's masks; "torch's"; "none"
    rollout: str = ""  # GRPO: how completions are sampled (describe_rollout); "" for the other objectives
    rollout_cost: Optional[dict] = None  # GRPO: a step's generation and update seconds (loraft.rollout_cost), or None
    reasons: dict = field(default_factory=dict)
    capabilities: dict = field(default_factory=dict)
    tuning: Optional[dict] = None  # the measurement the speed choices came from (loraft.tune), or None

    @property
    def use_cpu(self) -> bool:
        """Trainer's `use_cpu`: everything but CUDA trains on the CPU (MPS included, as before the plan)."""
        return self.device != "cuda"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> "Plan":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in payload.items() if k in names})

    def describe(self) -> str:
        """The plan as train.log and `loraft plan` print it: one line per decision, with its reason."""
        batch = (f"{self.world_size} process(es) x {self.samples_per_batch} sample(s) per batch x "
                 f"{self.accumulation} accumulated")
        rows = [
            ("device", self.device, "device"),
            ("precision", self.precision, "precision"),
            ("weights", self.weights, "weights"),
            ("batch", batch, "batch"),
            ("sub-batches", f"<= {self.micro_batch_tokens} tokens" if self.micro_batch_tokens else "none",
             "micro_batch_tokens"),
            ("sampler", self.sampler, "sampler"),
            ("fused loss", "yes" if self.fused_loss else "no", "fused_loss"),
            ("packing", "yes" if self.packing else "no", "packing"),
            ("speed path", self.speed_path, "speed_path"),
            ("attention", self.attention_label, "attention"),
            ("optimizer", self.optimizer, "optimizer"),
            ("grad checkpointing", "yes" if self.gradient_checkpointing else "no", "gradient_checkpointing"),
            ("generation dtype", self.generation_dtype, "generation_dtype"),
            ("lora dropout", self.lora_dropout, "lora_dropout"),
            ("retention guard", self.retention, "retention"),
        ]
        if self.rollout:
            rows.append(("rollout", self.rollout, "rollout"))
            rows.append(("rollout cost", rollout_cost.describe(self.rollout_cost) if self.rollout_cost
                         else "not measured", "rollout_cost"))
        lines = [f"  {name:19} {value}" + (f"  ({self.reasons[key]})" if self.reasons.get(key) else "")
                 for name, value, key in rows]
        if self.tuning and self.tuning.get("predicted_step"):
            predicted = self.tuning["predicted_step"]
            lines.append(f"  {'measured':19} in {self.tuning.get('seconds')} s at the model's width: a step predicted "
                         f"{predicted.get('chosen')} s, the reference's path {predicted.get('recipe')} s")
        elif self.tuning and self.tuning.get("layouts"):
            timings = ", ".join(f"{name} {seconds} s" for name, seconds in self.tuning["layouts"].items())
            lines.append(f"  {'measured':19} in {self.tuning.get('seconds')} s at the model's width: the attention "
                         f"over one of TRL's batches ({timings})")
        return "plan:\n" + "\n".join(lines)

    @property
    def fast_dropout(self) -> bool:
        """LoRA dropout's nn.Dropout modules are replaced by loraft.fastpaths.dropout's."""
        return self.lora_dropout == FAST_DROPOUT

    @property
    def attention_label(self) -> str:
        if self.attention_patch:
            return "loraft patch"
        return self.attention or "library default"


def model_type_of(model_config: Any) -> str:
    """`model_type` of a transformers config object or a config.json dict."""
    value = model_config.get("model_type") if isinstance(model_config, dict) else getattr(model_config, "model_type", None)
    return str(value or "unknown")


def world_size_from_env() -> int:
    """Processes in this run as torchrun / accelerate launch set them (1 without a launcher)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def make_plan(config: RunConfig, caps: Capabilities, model_config: Any, world_size: int = 1,
              tuning: Optional[dict] = None, rollout_cost: Optional[dict] = None) -> Plan:
    """Decide everything the run depends on (see the module docstring); a pure function of its arguments.

    Args:
        tuning: a measurement of the speed choices (loraft.tune.measure/cached), or None for the static defaults.
        rollout_cost: GRPO's step timed on this machine (loraft.rollout_cost.measure/cached), or None.
    Raises:
        ConfigError: a setting this machine cannot run (fp16 without CUDA).
    """
    train, model = config.train, config.model
    reasons: dict[str, str] = {}
    kind = model_type_of(model_config)
    entry = fast_path(kind)
    prompt_learning = config.adapter.method in PROMPT_LEARNING

    reasons["device"] = "set in the config (model.device)" if model.device != "auto" else "auto: the first of cuda, mps, cpu here"
    precision, reasons["precision"] = choose_precision(train.precision, caps)
    if precision == "fp16" and caps.device != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")

    if model.quantization != "none":
        weights = {"nf4": "nf4 (bitsandbytes, double-quantized)", "int8": "int8 (bitsandbytes)"}[model.quantization]
        reasons["weights"] = f"model.quantization={model.quantization}, computing in {precision}"
    elif model.dtype != "auto":
        weights = model.dtype
        reasons["weights"] = "set in the config (model.dtype)"
    elif precision in ("bf16", "fp16"):
        weights = f"frozen linear weights in {precision}, trainable ones fp32"
        reasons["weights"] = "half the bytes read per matmul; trainable copies start from the exact weights"
    else:
        weights = "fp32"
        reasons["weights"] = "fp32 compute"

    # attention: the family's patch replaces the default implementation unless one is chosen
    attention, patch = model.attn_implementation, patches_on_load(kind, model.attn_implementation)
    reasons["attention"] = ("set in the config (model.attn_implementation)" if model.attn_implementation
                            else "the family's speed path" if patch else "transformers' default for this family")
    choice = (tuning or {}).get("choice") or {}
    if choice.get("attention") == "eager" and not model.attn_implementation:
        reasons["attention"] = (f"measured faster than the {'patch' if patch else 'library default'} on this "
                                "machine (loraft.tune)")
        attention, patch = "eager", False

    budget = micro_batch_budget(train.micro_batch_tokens, precision, config.data.max_length)
    if train.micro_batch_tokens != "auto":
        reasons["micro_batch_tokens"] = "set in the config (train.micro_batch_tokens)"
    elif "micro_batch_tokens" in choice:
        budget = int(choice["micro_batch_tokens"])
        reasons["micro_batch_tokens"] = "measured fastest of the candidates on this machine (loraft.tune)"
    else:
        reasons["micro_batch_tokens"] = (f"static default for {precision} at max_length {config.data.max_length}"
                                         + (" (train.autotune=false)" if not train.autotune else ""))
    samples, accumulation = plan_micro_batches(train.per_device_train_batch_size, train.gradient_accumulation_steps,
                                               budget)
    reasons["batch"] = ("the step's samples collated once, run in sub-batches (same step and loss)" if budget
                        else "the configured batch and accumulation")

    reasons["sampler"] = {"length_grouped": "similar lengths share a step: little padding",
                          "random": "the reference's order", "sequential": "set in the config",
                          "group_by_length": "Trainer's"}[train.sampling]

    fused = False
    if not train.supervised_loss:
        reasons["fused_loss"] = "off (train.supervised_loss=false)"
    elif prompt_learning:
        reasons["fused_loss"] = "prompt and prefix tuning prepend virtual tokens to the logits"
    elif world_size > 1:
        reasons["fused_loss"] = f"{world_size} processes: the wrapped model (DDP) must be called whole"
    elif entry is None or not entry.supervised_loss:
        reasons["fused_loss"] = f"no speed path registered for model_type {kind}"
    elif choice.get("fused_loss") is False:
        reasons["fused_loss"] = "measured slower than the full logits on this machine (loraft.tune)"
    else:
        fused = True
        reasons["fused_loss"] = "lm_head and the loss only at supervised positions, in chunks (same loss)"

    packing = False
    if not train.packing:
        reasons["packing"] = "off (train.packing=false; not faster than length-grouped padding on CPUs measured)"
    elif prompt_learning:
        reasons["packing"] = "prompt and prefix tuning prepend virtual tokens to every sequence"
    elif entry is None or entry.packing is None:
        reasons["packing"] = f"model_type {kind} has no way registered to keep packed samples apart"
    elif entry.packing == "segments" and not patch:
        reasons["packing"] = f"{kind} keeps packed samples apart only in loraft's attention patch"
    else:
        packing = True
        reasons["packing"] = f"samples packed into rows, kept apart by {entry.packing}"

    goal = objective(train.objective)
    if goal.loss != "loraft":  # TRL's trainer computes the loss: loraft's batch layout and loss do not apply
        samples, accumulation = train.per_device_train_batch_size, train.gradient_accumulation_steps
        budget, fused, packing = 0, False, False
        trl = f"train.objective={train.objective}: TRL's trainer"
        reasons["micro_batch_tokens"] = f"{trl} runs the configured batch and accumulation"
        reasons["batch"] = "the configured batch and accumulation"
        reasons["fused_loss"] = f"{trl} computes the completions' log-probabilities with its own fused lm_head"
        reasons["packing"] = f"{trl} pads each batch"
        sampler = "sequential" if goal.sequential else ("random" if train.sampling == "length_grouped"
                                                          else train.sampling)
        reasons["sampler"] = (goal.sequential or (reasons["sampler"] if sampler == train.sampling
                                                   else "random: length grouping is loraft's SFT sampler"))
    else:
        sampler = train.sampling

    if entry is None:
        speed_path = "none: trains at transformers' speed"
        reasons["speed_path"] = f"no loraft.fastpaths entry for model_type {kind}"
    else:
        speed_path = f"{kind}: " + (entry.description if patch and entry.description else "fused loss, packing")
        reasons["speed_path"] = "registered in loraft.fastpaths"

    optimizer = train.optim
    reasons["optimizer"] = "set in the config (train.optim)"
    if "optimizer" in choice and train.optim == "adamw_torch_fused":
        optimizer = choice["optimizer"]
        reasons["optimizer"] = "measured fastest on this machine (loraft.tune)"

    reasons["gradient_checkpointing"] = "train.gradient_checkpointing"
    lora_dropout, reasons["lora_dropout"] = choose_lora_dropout(config, caps.device, goal)
    rollout = ""
    if train.objective == "grpo":
        rollout, reasons["rollout"] = describe_rollout(config, precision, world_size)
        reasons["rollout_cost"] = (
            "each part timed on one layer at the model's width and scaled to its depth and vocabulary "
            "(loraft.rollout_cost); metrics.jsonl logs the measured generation_seconds beside step_time"
            if rollout_cost else "autotune off, several processes, or not measured yet (`loraft plan --measure`)")
    else:
        rollout_cost = None
    generation_dtype, reasons["generation_dtype"] = choose_inference_dtype(config.generation.dtype, caps)
    retention, reasons["retention"] = describe_guard(config)
    return Plan(
        device=caps.device, precision=precision, weights=weights, micro_batch_tokens=budget,
        samples_per_batch=samples, accumulation=accumulation, sampler=sampler, fused_loss=fused,
        packing=packing, model_type=kind, speed_path=speed_path, attention=attention, attention_patch=patch,
        optimizer=optimizer, gradient_checkpointing=train.gradient_checkpointing, world_size=world_size,
        generation_dtype=generation_dtype, retention=retention, lora_dropout=lora_dropout, rollout=rollout,
        rollout_cost=rollout_cost, reasons=reasons, capabilities=caps.to_dict(), tuning=tuning,
    )


def describe_rollout(config: RunConfig, precision: str, world_size: int) -> tuple[str, str]:
    """GRPO's sampling as the plan shows it, and what sets its cost: (line, reason)."""
    grpo, train = config.grpo, config.train
    rows = train.per_device_train_batch_size * train.gradient_accumulation_steps * world_size
    prompts = max(rows // grpo.num_generations, 1)
    line = (f"{prompts} prompt(s) a step x {grpo.num_generations} completions of <= {grpo.max_completion_length} "
            f"tokens, T {grpo.temperature}, top_p {grpo.top_p}{f', top_k {grpo.top_k}' if grpo.top_k else ''}; "
            f"transformers generate (KV cache, {rows // world_size} rows a batch) on the policy in {precision}")
    reason = (f"generation is {grpo.max_completion_length} sequential decoding steps of {rows // world_size} rows; "
              f"the update a forward and backward over the same rows' prompt + completion tokens")
    return line, reason


def choose_lora_dropout(config: RunConfig, device: str, goal) -> tuple[str, str]:
    """(the plan's lora_dropout, its reason): loraft's CPU masks where peft's nn.Dropout would run on the CPU."""
    adapter = config.adapter
    if adapter.method != "lora" or adapter.dropout == 0:
        return "none", ("adapter.dropout=0" if adapter.method == "lora" else f"adapter.method={adapter.method}")
    if goal.loss != "loraft":
        return "none", f"train.objective={config.train.objective}: TRL's trainer disables dropout"
    if device != "cpu":
        return "torch's", f"nn.Dropout: the {device} generator is parallel"
    return FAST_DROPOUT, "same distribution as nn.Dropout at a third of its cost on a CPU (loraft.fastpaths.dropout)"


# ------------------------------------------------------------------------------------------ gathering the inputs
def read_model_config(config: RunConfig, offline_shape: bool = False):
    """The base model's config (architecture only, no weights); with `offline_shape`, a preset's shipped shape
    where the model itself cannot be read (no hub here). Returns (model_config, where it came from)."""
    from transformers import AutoConfig

    from loraft.errors import ModelError
    from loraft.presets import shipped_shape

    model = config.model
    if gguf_base.is_gguf(model.name_or_path):  # the shapes from the file's header: nothing dequantized
        try:
            return AutoConfig.from_pretrained(gguf_base.resolve(model.name_or_path)), model.name_or_path
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{model.name_or_path}: cannot read the model's config ({first})") from None
    if model.name_or_path.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model.name_or_path)):
        raise ModelError(f"{model.name_or_path}: model directory not found (model.name_or_path)")
    shape = shipped_shape(model.name_or_path) if offline_shape and not os.path.isdir(model.name_or_path) else None
    if shape is not None:  # the model's published config, shipped with loraft: no network needed
        return AutoConfig.from_pretrained(str(shape)), f"{model.name_or_path} (shape shipped with loraft)"
    try:
        return AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                          trust_remote_code=model.trust_remote_code), model.name_or_path
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{model.name_or_path}: cannot read the model's config ({first})") from None


def plan_run(config: RunConfig, model_config: Any, world_size: Optional[int] = None, measure: bool = True,
             log=None, prompt_tokens: Optional[int] = None, data_follows: bool = False) -> Plan:
    """The run's plan on this machine: capabilities, then the cached speed measurement, or a new one when
    `measure` and autotune allow it (one process only: ranks of a multi-process run read the cache).

    Args:
        prompt_tokens: GRPO: the prompts' mean length, once the data is read (`with_data`); None before.
        data_follows: the data is read next and `with_data` plans again: GRPO's step is not timed at an assumed
            prompt length now (only a cached estimate is read).
    """
    from loraft import tune
    from loraft.precision import machine_capabilities

    world_size = world_size or world_size_from_env()
    caps = machine_capabilities(config.model.device)
    precision, _ = choose_precision(config.train.precision, caps)
    tuning = None
    # the speed measurement chooses SFT's sub-batches, loss, attention and optimizer; for an objective TRL's trainer
    # runs (its batch, its loss) only the attention
    trl = objective(config.train.objective).loss != "loraft"
    if tune.autotune_enabled(config) and (trl or config.train.micro_batch_tokens == "auto"):
        tuning = tune.cached(config, precision, model_config)
        if tuning is None and measure and world_size == 1:
            tuning = (tune.measure_attention if trl else tune.measure)(
                config, precision, model_config, device=_torch_device(caps, config), **({"log": log} if log else {}))
    cost = None
    if config.train.objective == "grpo" and tune.autotune_enabled(config):
        cost = rollout_cost.cached(config, precision, model_config, prompt_tokens)
        if cost is None and measure and world_size == 1 and not data_follows:
            cost = rollout_cost.measure(config, precision, model_config, prompt_tokens,
                                        device=_torch_device(caps, config), **({"log": log} if log else {}))
    return make_plan(config, caps, model_config, world_size, tuning, cost)


def with_data(plan: Plan, config: RunConfig, model_config: Any, report: dict, log=None) -> Plan:
    """The plan once the data is read: GRPO's step timed at the prompts' mean length (the plan before it could only
    assume one); any other plan as it is."""
    if not plan.rollout:
        return plan
    kept = report.get("samples_kept") or 0
    prompt_tokens = round((report.get("tokens") or {}).get("prompt", 0) / kept) if kept else None
    planned = plan_run(config, model_config, plan.world_size, measure=True, log=log, prompt_tokens=prompt_tokens)
    if planned.rollout_cost and log:
        log(f"rollout cost: {rollout_cost.describe(planned.rollout_cost)}")
    return planned


def _torch_device(caps: Capabilities, config: RunConfig) -> str:
    return config.model.device if config.model.device not in ("auto",) else caps.device
