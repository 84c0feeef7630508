"""Load the base model and tokenizer, attach the peft adapter, and check what a target pattern matches.

peft owns the adapter layers and their format; this module only builds the right `PeftConfig`, checks
that the target pattern matches something before training starts, and deals with tied embeddings.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch

from loraft import gguf_base
from loraft.config import AdapterConfig, ModelConfig, RunConfig
from loraft.errors import ModelError
from loraft.fastpaths import apply_patch, patches_on_load, supports_supervised_loss
from loraft.fastpaths.dropout import use_fast_dropout
from loraft.precision import DTYPES, resolve_device
from loraft.weights import (cast_frozen_weights, cast_parameters, detach_from_checkpoint, prepare_for_training,
                            quantization_config)

logger = logging.getLogger("loraft")

def resolve_dtype(model: ModelConfig, precision: str = "fp32") -> torch.dtype:
    """The dtype to load the base weights in: `model.dtype`, or fp32 master weights under `auto`."""
    if model.dtype != "auto":
        return DTYPES[model.dtype]
    return torch.float32


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token (EOS) when the model has none, so batches can be padded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_base.resolve(name_or_path), revision=revision,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # ValueError: transformers' word for a folder with no tokenizer it can build
        raise ModelError(f"{name_or_path}: cannot load a tokenizer ({first_line(exc)})") from None
    if tokenizer.eos_token is None:
        raise ModelError(f"{name_or_path}: the tokenizer has no EOS token, which every template needs")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model: ModelConfig, dtype: torch.dtype = torch.float32,
                    compute_dtype: Optional[torch.dtype] = None, attention: Optional[str] = None,
                    attention_patch: Optional[bool] = None):
    """Load the causal LM with `from_pretrained` (hub id or local dir), frozen weights in `dtype`.

    A half-precision `dtype` loads the checkpoint in its own dtype (memory-mapped, nothing copied) and casts
    the parameters one by one, releasing each one's mapped pages: the same weights as
    `from_pretrained(dtype=...)` without its peak (generation's peak RSS in docs/benchmarks.md).
    With `model.quantization` (loraft.weights) the linear layers load quantized, computing in `compute_dtype`
    (default: `dtype`), on the model's device.

    Args:
        attention, attention_patch: the attention implementation and whether the family's patch replaces it, as
            a training run's plan decided them; None (chat, generate, serve) = model.attn_implementation, with the
            patch where loraft.fastpaths applies it to that setting.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    bnb_config = quantization_config(model.quantization, compute_dtype or dtype)
    half = dtype in (torch.bfloat16, torch.float16) and bnb_config is None
    kwargs = {"dtype": "auto" if half else dtype, "revision": model.revision,
              "trust_remote_code": model.trust_remote_code}
    if bnb_config is not None:
        kwargs.update(quantization_config=bnb_config, device_map={"": str(resolve_device(model.device))})
    source = model.name_or_path
    if gguf_base.is_gguf(model.name_or_path):  # its dequantized copy, as an ordinary folder (loraft.gguf_base)
        variant = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        source = gguf_base.resolve(model.name_or_path, weights=variant)
        kwargs["variant"] = variant
        if bnb_config is None:  # stored in that dtype already: loaded as it is, nothing to cast afterwards
            kwargs["dtype"], half = dtype, False
    try:
        config = AutoConfig.from_pretrained(source, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
        if attention_patch is None:
            attention, attention_patch = model.attn_implementation, patches_on_load(config.model_type,
                                                                                    model.attn_implementation)
        if attention and not attention_patch:
            kwargs["attn_implementation"] = attention
        loaded = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
    except OSError as exc:
        raise ModelError(f"{model.name_or_path}: cannot load the base model ({first_line(exc)})") from None
    if source != model.name_or_path:  # peft names the base in adapter_config.json by this: the GGUF file itself
        loaded.name_or_path = loaded.config._name_or_path = str(gguf_base.gguf_file(model.name_or_path))
    if half:
        cast_parameters(loaded, dtype)
    if bnb_config is not None:
        detach_from_checkpoint(loaded)
    if attention_patch:
        apply_patch(loaded)
    return loaded


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def build_peft_config(adapter: AdapterConfig, tokenizer=None, model_name: Optional[str] = None):
    """Translate `adapter.*` into the peft config for the chosen method."""
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    if adapter.method == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            modules_to_save=adapter.modules_to_save,
            use_rslora=adapter.use_rslora,
            use_dora=adapter.use_dora,
        )
    if adapter.method == "ia3":
        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=adapter.target_modules,
            feedforward_modules=adapter.feedforward_modules or [],
            modules_to_save=adapter.modules_to_save,
        )
    if adapter.method == "prompt_tuning":
        if adapter.prompt_tuning_init == "text":
            if not adapter.prompt_tuning_init_text:
                raise ModelError("adapter.prompt_tuning_init_text is required when adapter.prompt_tuning_init is text")
            return PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=adapter.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=adapter.prompt_tuning_init_text,
                tokenizer_name_or_path=model_name,
            )
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapter.num_virtual_tokens)
    if adapter.method == "prefix_tuning":
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=adapter.num_virtual_tokens,
            prefix_projection=adapter.prefix_projection,
        )
    raise ModelError(f"adapter.method: unknown method {adapter.method!r}")


def target_matches(model: torch.nn.Module, adapter: AdapterConfig) -> list[str]:
    """Names of the modules the adapter's `target_modules` selects, with peft's own matching rules."""
    if adapter.method not in ("lora", "ia3") or adapter.target_modules is None:
        return []
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = build_peft_config(adapter)
    matched = []
    for name, _module in model.named_modules():
        if not name:
            continue
        found = check_target_module_exists(peft_config, name)
        if found and type(found).__name__ != "_ExcludedModule":
            matched.append(name)
    return matched


def _example_module_names(model: torch.nn.Module, limit: int = 6) -> list[str]:
    """A few adaptable module names (linear layers of the first block) to show when a pattern misses."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    first_block = [n for n in names if re.search(r"\.0\.", n)]
    return (first_block or names)[:limit]


def check_targets(model: torch.nn.Module, adapter: AdapterConfig) -> list[str]:
    """Fail early, in one sentence, when the target pattern or modules_to_save match nothing."""
    matched = target_matches(model, adapter)
    if adapter.method in ("lora", "ia3") and not matched:
        examples = ", ".join(_example_module_names(model))
        raise ModelError(
            f"adapter.target_modules {adapter.target_modules!r} matches no module of the model; "
            f"module names look like: {examples}"
        )
    module_names = [n for n, _ in model.named_modules()]
    for wanted in adapter.modules_to_save or []:
        if not any(n == wanted or n.endswith("." + wanted) for n in module_names):
            top = sorted({n.split(".")[-1] for n in module_names if n and not n.split(".")[-1].isdigit()})[:10]
            raise ModelError(
                f"adapter.modules_to_save: {wanted!r} matches no module of the model; names look like: {', '.join(top)}"
            )
    return matched


def tied_embedding_note(model: torch.nn.Module, adapter: AdapterConfig) -> Optional[dict]:
    """Describe how a trained copy of a tied embedding behaves, or None when nothing is tied/saved.

    BLOOM ties lm_head to word_embeddings, and peft's tying support only knows embed_tokens/lm_head.
    With modules_to_save=["word_embeddings"] peft trains a copy of the input embedding while lm_head keeps
    pointing at the frozen original: the tie is broken during training (as in the reference recipe).
    loraft keeps exactly that function everywhere: the adapter stores only the input-embedding copy,
    plain `PeftModel.from_pretrained` rebuilds the same split, and `loraft merge` writes untied weights
    so a reload cannot silently re-tie lm_head to the trained embedding (peft issue #2777).
    """
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    if input_embeddings is None or output_embeddings is None:
        return None
    if output_embeddings.weight is not input_embeddings.weight:
        return None
    names = {module: name for name, module in model.named_modules()}
    input_name, output_name = names[input_embeddings], names[output_embeddings]
    saved = adapter.modules_to_save or []
    trains_input = any(input_name == s or input_name.endswith("." + s) for s in saved)
    trains_output = any(output_name == s or output_name.endswith("." + s) for s in saved)
    if not (trains_input or trains_output):
        return None
    trained, frozen = (input_name, output_name) if trains_input else (output_name, input_name)
    if trains_input and trains_output:
        message = (
            f"{output_name} is tied to {input_name}; both are in modules_to_save, so peft trains two separate "
            "copies: the tie is broken for training, the adapter and merge (loraft merge writes untied weights)."
        )
    else:
        message = (
            f"{output_name} is tied to {input_name}; modules_to_save trains a copy of {trained} only, so {frozen} "
            "keeps the base weights (the tie is broken, as in the reference recipe). The adapter, a plain peft "
            "reload and loraft merge (which writes untied weights) all compute this same function."
        )
    return {"input": input_name, "output": output_name, "trained": trained, "frozen": frozen, "message": message}


def attach_adapter(model: torch.nn.Module, adapter: AdapterConfig, tokenizer=None, model_name: Optional[str] = None):
    """Wrap the base model with a fresh peft adapter after checking what it targets.

    Returns:
        (peft_model, info) where info has `target_matches` and `tied_embeddings` (or None).
    """
    from peft import get_peft_model

    matched = check_targets(model, adapter)
    tied = tied_embedding_note(model, adapter)
    if tied:
        logger.info("tied embeddings: %s", tied["message"])
    peft_config = build_peft_config(adapter, tokenizer, model_name)
    peft_model = get_peft_model(model, peft_config)
    return peft_model, {"target_matches": matched, "tied_embeddings": tied}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward computes the logits of chosen positions only (transformers' `logits_to_keep`);
    a PeftModel is asked about its base model."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def meta_counts(model_config, adapter: AdapterConfig, trust_remote_code: bool = False) -> dict:
    """Parameter counts of the model with `adapter` attached, built from its config on the meta device (no
    weights read, no memory): {"trainable_params", "total_params", "embedding_params", "info"}."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    _, total = count_parameters(model)
    embedding = model.get_input_embeddings()
    embedding_params = embedding.weight.numel() if embedding is not None else 0
    peft_model, info = attach_adapter(model, adapter)
    trainable, _ = count_parameters(peft_model)
    return {"trainable_params": trainable, "total_params": total, "embedding_params": embedding_params,
            "info": info}


def load_model_for_training(config: RunConfig, plan, tokenizer=None, attach: bool = True):
    """Base model + adapter for `config`, as `plan` (loraft.plan) decided; returns (model, info).

    The adapter is a fresh one, or with `model.adapter_from` that finished run's adapter, loaded trainable: the
    run continues training it (its adapter settings are the run's: loraft.train puts them in the config).
    `attach=False` and no adapter_from: the base is returned, with the fresh adapter's peft config as
    info["peft_config"], for a trainer that wraps the model itself (TRL's DPO/KTO: its reference is then the base
    with the adapter off, not a copy of a fresh adapter); call cast_for_plan on the wrapped model.
    Under bf16/fp16 precision the base loads in fp32 (trainable copies such as modules_to_save start from
    the exact weights), then the frozen linear weights are stored in the compute dtype (cast_frozen_weights).
    """
    dtype = resolve_dtype(config.model, plan.precision)
    compute = DTYPES[plan.precision]
    base = load_base_model(config.model, dtype, compute_dtype=compute, attention=plan.attention,
                           attention_patch=plan.attention_patch)
    base = prepare_for_training(base, plan.gradient_checkpointing)  # QLoRA only
    if plan.fused_loss and not supports_supervised_loss(base):
        raise ModelError(f"{config.model.name_or_path}: the plan chose the fused loss, but this model's lm_head is "
                         "not a plain linear layer; set train.supervised_loss=false")
    if config.model.adapter_from:
        from peft import PeftModel

        tied = tied_embedding_note(base, config.adapter)
        model = PeftModel.from_pretrained(base, config.model.adapter_from, is_trainable=True)
        info = {"target_matches": target_matches(base, config.adapter), "tied_embeddings": tied,
                "continued_from": config.model.adapter_from}
    elif not attach:
        matched = check_targets(base, config.adapter)
        info = {"target_matches": matched, "tied_embeddings": tied_embedding_note(base, config.adapter),
                "peft_config": build_peft_config(config.adapter, tokenizer, config.model.name_or_path)}
        return base, info
    else:
        model, info = attach_adapter(base, config.adapter, tokenizer, config.model.name_or_path)
    cast_for_plan(model, config, plan, info)
    if getattr(plan, "fast_dropout", False):
        info["fast_dropout"] = use_fast_dropout(model)
    return model, info


def cast_for_plan(model, config: RunConfig, plan, info: dict) -> None:
    """Store the frozen linear weights of the adapted `model` in the plan's half precision (see
    load_model_for_training); records what was cast in info["cast_frozen_weights"]."""
    if plan.precision in ("bf16", "fp16") and config.model.dtype == "auto" and config.model.quantization == "none":
        info["cast_frozen_weights"] = cast_frozen_weights(model, DTYPES[plan.precision])


def load_run_model(run, dtype: Optional[torch.dtype] = None, device: Optional[str] = None, quantized: bool = True,
                   adapter: bool = True):
    """Load base + adapter from a run directory that its caller opened and checked (`loraft.run_access.open_run`: a
    UsableRun: finished, or allowed; trust_remote_code only as granted). What chat/generate/eval/merge/serve use.
    A QLoRA run's base loads quantized as it was trained, unless `quantized=False` (merge); `adapter=False` gives the
    base alone (what the run started from, beside the adapter in a UI), with the same tokenizer and template.

    Returns:
        (peft_model in eval mode (the base model with adapter=False), tokenizer carrying the run's chat_template)
    """
    from peft import PeftModel

    config = run.config
    tokenizer = load_tokenizer(str(run.adapter_dir))
    target = resolve_device(device or config.model.device)
    model_config = config.model.model_copy(update={"device": str(target)} if quantized else {"quantization": "none"})
    base = load_base_model(model_config, dtype or torch.float32)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir)) if adapter else base
    model.eval()
    if model_config.quantization == "none":  # a quantized base was placed on the device as it loaded
        model.to(target)
    return model, tokenizer
