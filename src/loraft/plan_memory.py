"""A training run's peak memory, estimated from its plan and the parameter counts before anything loads: what
`loraft plan` prints and train.log compares with the measured peak. Each term is named in the result."""

from __future__ import annotations

from typing import Any

from loraft.config import RunConfig
from loraft.objective_table import objective
from loraft.plan import Plan

GIB = 1024**3
RUNTIME_BYTES = 0.75 * GIB  # Python, torch, transformers, peft, datasets: the demo fine-tune with tiny weights (docs/benchmarks.md)
# Activation bytes per token per layer kept for backward, in units of hidden x element size: 34 for a GPT-style
# block with 16-bit activations (Korthikanti et al. 2022, "Reducing Activation Recomputation"), 17 element-sized
# tensors of the width; plus eager attention's scores, 5 x heads x sequence per token.
ACTIVATION_WIDTHS = 17


def estimate_memory(plan: Plan, config: RunConfig, model_config: Any, total_params: int, trainable_params: int,
                    embedding_params: int = 0) -> dict:
    """Peak memory of a training run, in GiB, from the plan and the parameter counts (how: see each term).

    Terms: the base's weights as stored (fp32 4 bytes; half precision 2 for the linear layers; NF4 ~0.56, int8 1);
    trainable parameters 16 bytes each (fp32 weight, gradient, AdamW's two moments); activations of the largest
    sub-batch (ACTIVATION_WIDTHS x hidden per token per layer, plus eager attention's scores); the logits
    (full: tokens x vocab in fp32, three copies; fused: one chunk); and the runtime.
    """
    from loraft.tune import shape_of

    shape = shape_of(model_config)
    hidden, layers = int(shape["hidden_size"] or 0), int(shape["layers"] or 0)
    heads, vocab = int(shape["heads"] or 1), int(shape["vocab_size"] or 0)
    element = 4 if plan.precision == "fp32" else 2
    per_weight = {"nf4": 0.5625, "int8": 1.0}.get(config.model.quantization)
    if per_weight is None:
        per_weight = 4 if plan.precision == "fp32" or config.model.dtype == "fp32" else 2
    # embeddings are looked up, not multiplied: they stay fp32 unless quantization or model.dtype says otherwise
    # the base's weights all stay (modules_to_save trains a copy); trainable parameters come on top
    weights = embedding_params * 4 + max(total_params - embedding_params, 0) * per_weight
    trainable = trainable_params * 16
    length = config.data.max_length
    tokens = plan.micro_batch_tokens or length * plan.samples_per_batch
    tokens = max(tokens, length)
    reference = 0
    goal = objective(config.train.objective)
    # TRL forwards chosen and rejected (or a completion and its KL partner) as one batch: two sequences per sample
    tokens *= goal.pairs_per_sample
    if goal.loss != "loraft" and config.model.adapter_from:
        # TRL's fused lm_head computes log-probabilities in chunks; with adapter_from the reference is a frozen copy
        # of the adapter (~ trainable / 4)
        reference = trainable_params * 4
    if plan.gradient_checkpointing:
        activations = tokens * hidden * element * (layers + ACTIVATION_WIDTHS)
    else:
        activations = tokens * hidden * element * ACTIVATION_WIDTHS * layers
    if not plan.attention_patch and plan.attention in (None, "eager"):
        activations += 5 * heads * length * tokens * element * layers / 2
    chunked = plan.fused_loss or goal.loss != "loraft"
    logits = (16 * 1024 * 1024 * 4 * 3) if chunked else tokens * vocab * 4 * 3
    parts = {"weights": weights, "trainable (weights, grads, AdamW)": trainable, "activations": activations,
             "logits": logits, "runtime": RUNTIME_BYTES}
    if reference:
        parts["reference adapter"] = reference
    return {"peak_gib": round(sum(parts.values()) / GIB, 2),
            "parts_gib": {name: round(value / GIB, 2) for name, value in parts.items()},
            "how": "weights as stored + 16 bytes per trainable parameter + activations of the largest sub-batch + "
                   "logits + runtime (loraft.plan.estimate_memory)"}
