"""GRPO's step on this machine, estimated before the run: the seconds of generation against those of the update.

A GRPO step samples R completions (train.per_device_train_batch_size x gradient_accumulation_steps) of up to L
tokens (grpo.max_completion_length) with `generate`, then runs a forward and backward over the R rows' prompt and
completion tokens, plus, with grpo.beta > 0, a forward with the adapter off for the reference. As loraft.tune times
SFT's step, this times each part on one decoder layer of the base model at its real width, with the run's LoRA, in
the plan's precision, and scales by the depth; the head (hidden x vocabulary) and the sampling are timed on a slice
of the vocabulary and scaled to all of it (the update's head in fp32 off CUDA, as TRL's chunked log-probabilities
compute it there):

    generation = layers x (prefill of R x P tokens + L x one decoding step of R rows over a cache of P + L/2)
                 + L x (head + sampling over R rows)
    update     = layers x forward and backward of R x (P + L) tokens + head forward and backward over R x L rows
                 (+ layers x a forward of R x (P + L) tokens when beta > 0)

P is the prompts' mean length in tokens once the data is read (train.log), else data.max_length / 4 (said so). Every
completion is taken at its full L tokens, so a step whose completions end earlier generates for less: the
generation figure is an upper bound. metrics.jsonl logs the measured generation_seconds beside step_time. The result
is cached per machine and shape under $LORAFT_HOME/tuning; `train.autotune: false` or $LORAFT_AUTOTUNE=0 skips it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional

import torch

from loraft.config import RunConfig
from loraft.precision import DTYPES, machine_identity
from loraft.one_layer import layer_config, timed
from loraft.tune import VOCAB_SLICE, read_measurement, shape_of, store_measurement

logger = logging.getLogger("loraft")

ROLLOUT_VERSION = 1
DECODE_STEPS = 8  # decoding steps timed together (the best of 5 rounds counts); each grows the cache by one token


def rows_per_step(config: RunConfig) -> int:
    """Completions one process samples a step (its generate batch)."""
    return config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps


def _prompt(config: RunConfig, prompt_tokens: Optional[int]) -> tuple[int, str]:
    """(prompt tokens, where the number comes from): the data's mean, else data.max_length / 4."""
    if prompt_tokens:
        return int(prompt_tokens), "the data's mean"
    return max(1, config.data.max_length // 4), "assumed: data.max_length / 4"


def _key(config: RunConfig, precision: str, model_config: Any, prompt_tokens: Optional[int]) -> dict:
    grpo, adapter = config.grpo, config.adapter
    tokens, source = _prompt(config, prompt_tokens)
    return {"version": ROLLOUT_VERSION, "machine": machine_identity(), "shape": shape_of(model_config),
            "precision": precision, "rows": rows_per_step(config), "prompt_tokens": tokens, "prompt_source": source,
            "completion_tokens": grpo.max_completion_length, "beta": grpo.beta, "method": adapter.method,
            "r": adapter.r, "targets": json.dumps(adapter.target_modules, default=str),
            "attn_implementation": config.model.attn_implementation}


def cached(config: RunConfig, precision: str, model_config: Any, prompt_tokens: Optional[int] = None) -> Optional[dict]:
    """The cached estimate for this machine, shape, settings and prompt length, or None."""
    return read_measurement("rollout", _key(config, precision, model_config, prompt_tokens))


def _one_layer_policy(config: RunConfig, model_config: Any, precision: str, device: torch.device):
    """One decoder layer at the real width, with the run's LoRA where its targets match a layer-0 module (a pattern
    that names deeper layers only, such as the recipe's, leaves the layer plain), frozen weights stored as training
    stores them. Returns (model, its decoder body)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loraft.model import build_peft_config
    from loraft.weights import cast_frozen_weights

    one_layer = layer_config(model_config, 512)
    if config.model.attn_implementation:
        one_layer._attn_implementation = config.model.attn_implementation
    model = AutoModelForCausalLM.from_config(one_layer, dtype=torch.float32)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    body = model.base_model
    if config.adapter.method == "lora":
        try:
            model = get_peft_model(model, build_peft_config(config.adapter))
        except ValueError:  # no target in one layer: the layer's own cost
            pass
    if precision in ("bf16", "fp16"):
        cast_frozen_weights(model, DTYPES[precision])
    return model.to(device), body


def measure(config: RunConfig, precision: str, model_config: Any, prompt_tokens: Optional[int] = None,
            device: str = "cpu", log: Callable[[str], None] = logger.info) -> dict:
    """Time the parts (see the module docstring), cache the result and return it.

    Returns:
        {"key", "seconds", "generation_s", "update_s", "prompt_tokens", "prompt_source", "parts": {name: s}}
    """
    import time

    key = _key(config, precision, model_config, prompt_tokens)
    prompt_tokens, source = key["prompt_tokens"], key["prompt_source"]
    shape = key["shape"]
    started = time.perf_counter()
    target = torch.device(device)
    rows, completion = key["rows"], config.grpo.max_completion_length
    layers = int(shape["layers"] or 1)
    hidden_size = int(shape["hidden_size"])
    vocab = int(shape["vocab_size"] or VOCAB_SLICE)
    scale = vocab / min(vocab, VOCAB_SLICE)
    autocast = torch.autocast(target.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    model, body = _one_layer_policy(config, model_config, precision, target)
    generator = torch.Generator().manual_seed(0)

    def ids(width: int) -> torch.Tensor:
        return torch.randint(0, 512, (rows, width), generator=generator).to(target)

    prompt, total = ids(prompt_tokens), ids(prompt_tokens + completion)
    with torch.no_grad(), autocast:
        prefill = timed(lambda: body(input_ids=prompt, use_cache=True), repeats=5)
        cache = body(input_ids=ids(prompt_tokens + completion // 2), use_cache=True).past_key_values
        token = ids(1)

        def decode_steps() -> None:
            for _ in range(DECODE_STEPS):
                body(input_ids=token, past_key_values=cache, use_cache=True)

        decode = timed(decode_steps, repeats=5) / DECODE_STEPS
        reference = timed(lambda: body(input_ids=total, use_cache=False)) if config.grpo.beta > 0 else 0.0

    def update_work() -> None:
        with autocast:
            out = body(input_ids=total, use_cache=False).last_hidden_state
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    if not any(p.requires_grad for p in model.parameters()):  # a layer without LoRA still runs backward
        body.get_input_embeddings().weight.requires_grad_(True)
    update_work()
    update = timed(update_work, repeats=5)

    head_dtype = DTYPES[precision] if precision != "fp32" else torch.float32
    weight = (torch.randn(min(vocab, VOCAB_SLICE), hidden_size, generator=generator) * 0.02).to(target, head_dtype)
    states = torch.randn(rows, hidden_size, generator=generator).to(target, head_dtype)

    def head_and_sample() -> None:
        logits = torch.nn.functional.linear(states, weight).float()
        torch.multinomial(torch.softmax(logits, dim=-1), 1)

    head_and_sample()
    sample = timed(head_and_sample)
    # TRL's chunked log-probabilities multiply the head in fp32 off CUDA (trl.kernels.chunked_logprob._addmm_fp32)
    update_dtype = head_dtype if target.type == "cuda" else torch.float32
    train_weight = weight.to(update_dtype)
    train_rows = torch.randn(rows * completion, hidden_size, generator=generator).to(target, update_dtype)
    train_rows.requires_grad_(True)
    labels = torch.randint(0, weight.shape[0], (rows * completion,), generator=generator).to(target)

    def head_update() -> None:
        logits = torch.nn.functional.linear(train_rows, train_weight).float()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        train_rows.grad = None

    head_update()
    head_train = timed(head_update)

    parts = {"prefill": layers * prefill, "decoding": layers * decode * completion,
             "head and sampling": sample * scale * completion, "forward and backward": layers * update,
             "head forward and backward": head_train * scale, "reference forward": layers * reference}
    generation = parts["prefill"] + parts["decoding"] + parts["head and sampling"]
    update_seconds = parts["forward and backward"] + parts["head forward and backward"] + parts["reference forward"]
    result = {"key": json.loads(json.dumps(key, default=str)), "seconds": round(time.perf_counter() - started, 1),
              "generation_s": round(generation, 4), "update_s": round(update_seconds, 4),
              "prompt_tokens": prompt_tokens, "prompt_source": source,
              "parts": {name: round(value, 4) for name, value in parts.items() if value}}
    log(f"rollout cost: measured in {result['seconds']} s at {shape['model_type']} width {hidden_size} ({precision}, "
        f"once per machine and shape)")
    store_measurement("rollout", result)
    return result


def describe(result: dict) -> str:
    """The plan's line: `~G s generating + ~U s updating a step (generation N% of it)`."""
    generation, update = result["generation_s"], result["update_s"]
    share = generation / max(generation + update, 1e-9)
    return (f"~{_seconds(generation)} s generating + ~{_seconds(update)} s updating a step (generation {share:.0%}); "
            f"prompts of "
            f"{result['prompt_tokens']} tokens ({result['prompt_source']}), every completion at full length")


def _seconds(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"
