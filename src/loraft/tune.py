"""Speed choices measured on this machine at the model's real width, never guessed: loraft's autotune.

A machine that multiplies bf16 five times faster than fp32 and one that emulates it want different sub-batches;
an AVX2 CPU at the bloom-1b4-zh shape gained less from sub-batching than a Xeon capped to AVX2 predicted. So
before the first training of a shape on a machine, `measure` times, on one decoder layer of the base model's
real width (random weights, the run's precision, frozen weights stored as training stores them), forward and
backward of one optimizer step's samples (synthetic lengths as the sampler groups them: `step_lengths`) laid out as:

- the reference recipe's path: one sample at a time, eager attention (the library's for BLOOM), full logits;
- sub-batches (loraft.batching.split_by_tokens) of a quarter, half and all of the static budget
  (loraft.batching.micro_batch_budget: sized so activation memory stays within the reference's, which no
  candidate exceeds), with the family's own attention (its patch where it has one, else the library's default
  where that is sdpa) and with eager attention;

and, separately, lm_head + cross-entropy per row, full logits against loraft's fused loss (on a slice of the
vocabulary: the cost is linear in it; the fused loss computes only supervised rows, taken as at most
SUPERVISED_SHARE of them), and AdamW fused against foreach. Each choice is the measured
fastest, so the reference's own path wins where nothing beats it. The result is cached per machine and shape
under $LORAFT_HOME/tuning and stored in the plan; the whole measurement stops adding candidates past
BUDGET_SECONDS. `train.autotune: false` or $LORAFT_AUTOTUNE=0 skips it (the static defaults).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import torch

from loraft.batching import micro_batch_budget, split_by_tokens
from loraft.config import RunConfig
from loraft.fastpaths import patches_on_load
from loraft.files import cache_dir, write_json_atomically
from loraft.objective_table import objective
from loraft.one_layer import layer_config, library_default_attention, one_layer_model, timed
from loraft.precision import DTYPES, machine_identity

logger = logging.getLogger("loraft")

TUNE_VERSION = 3  # 3: the library's default attention (sdpa) measured against eager where no patch replaces it
BUDGET_SECONDS = 60.0
VOCAB_SLICE = 32768  # lm_head columns timed; the cost scales linearly to the real vocabulary
HEAD_ROWS = 128
HEAD_ROUNDS = 3
# the share of a step's positions the fused loss is assumed to compute: at most this many are supervised in
# instruction data (the recipe's alpaca-zh samples supervise about 65%: docs/benchmarks.md)
SUPERVISED_SHARE = 0.9
OPTIMIZER_PARAMETERS = 4 * 1024 * 1024
# how much faster a candidate must measure to replace the static default (or how much slower the default must
# measure for the reference's path to replace it): on a shared 2-core machine two timings of the same work
# differed by up to 20% (docs/benchmarks.md), so a smaller difference is not a measurement of anything
MARGIN = 0.10
LAYOUT_ROUNDS = 3


def autotune_enabled(config: RunConfig) -> bool:
    """train.autotune, unless $LORAFT_AUTOTUNE says 0/false/off."""
    return config.train.autotune and os.environ.get("LORAFT_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def _config_value(model_config: Any, *names: str, default=None):
    for name in names:
        value = model_config.get(name) if isinstance(model_config, dict) else getattr(model_config, name, None)
        if value is not None:
            return value
    return default


def shape_of(model_config: Any) -> dict:
    """The architecture fields the measurement depends on."""
    return {
        "model_type": _config_value(model_config, "model_type"),
        "hidden_size": _config_value(model_config, "hidden_size", "n_embd", "d_model"),
        "heads": _config_value(model_config, "num_attention_heads", "n_head"),
        "kv_heads": _config_value(model_config, "num_key_value_heads"),
        "intermediate_size": _config_value(model_config, "intermediate_size", "n_inner", "ffn_dim"),
        "vocab_size": _config_value(model_config, "vocab_size"),
        "layers": _config_value(model_config, "num_hidden_layers", "n_layer"),
    }


def step_lengths(config: RunConfig) -> list[int]:
    """Synthetic lengths of one optimizer step's samples, as the sampler makes them: length-grouped steps hold
    similar lengths (55%-65% of max_length), other orders any (evenly from 25% to 100%)."""
    count = config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps
    top = config.data.max_length
    low, high = (0.55, 0.65) if config.train.sampling == "length_grouped" else (0.25, 1.0)
    if count == 1:
        return [round(top * high)]
    return [max(2, round(top * (low + (high - low) * index / (count - 1)))) for index in range(count)]


def trl_batch_lengths(config: RunConfig) -> list[int]:
    """The lengths of one batch TRL's trainer forwards and backwards for a preference or GRPO objective: each
    process's samples at the step's synthetic lengths, the objective's pairs_per_sample sequences each (a chosen and
    a rejected one for DPO and ORPO, a completion and its KL partner for KTO); GRPO's completions at a quarter of
    data.max_length of prompt plus grpo.max_completion_length."""
    rows = config.train.per_device_train_batch_size
    if config.train.objective == "grpo":
        return [max(1, config.data.max_length // 4) + config.grpo.max_completion_length] * rows
    return step_lengths(config)[:rows] * objective(config.train.objective).pairs_per_sample


def tuning_key(config: RunConfig, precision: str, model_config: Any) -> dict:
    """What a measurement's answer depends on: the machine, the shape, the precision and the step's layout."""
    trl = objective(config.train.objective).loss != "loraft"
    return {"version": TUNE_VERSION, "machine": machine_identity(), "shape": shape_of(model_config),
            "precision": precision, "max_length": config.data.max_length,
            "lengths": trl_batch_lengths(config) if trl else step_lengths(config),
            "what": "attention in TRL's batch" if trl else "SFT's step",
            "attn_implementation": config.model.attn_implementation, "quantization": config.model.quantization,
            "trains_embedding": trains_input_embedding(config, model_config)}


def measurement_path(kind: str, key: dict):
    """Where a measurement of `kind` ("tune", "rollout") for `key` is cached: $LORAFT_HOME/tuning."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir("tuning") / f"{kind}-{digest}.json"


def read_measurement(kind: str, key: dict) -> Optional[dict]:
    """The cached measurement of `kind` whose key is `key`, or None."""
    key = json.loads(json.dumps(key, default=str))
    try:
        result = json.loads(measurement_path(kind, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("key") == key else None


def store_measurement(kind: str, result: dict) -> None:
    """Cache a measurement under its key; a read-only cache only costs measuring again next time."""
    try:
        path = measurement_path(kind, result["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, result)
    except OSError:
        pass


def cached(config: RunConfig, precision: str, model_config: Any) -> Optional[dict]:
    """The cached measurement for this machine and shape, or None."""
    return read_measurement("tune", tuning_key(config, precision, model_config))


def trains_input_embedding(config: RunConfig, model_config: Any) -> bool:
    """Whether the adapter trains a copy of the input embedding (modules_to_save), as the recipe does: then every
    forward/backward also fills its dense gradient at the real vocabulary, a cost per sub-batch."""
    from transformers import AutoModelForCausalLM

    saved = config.adapter.modules_to_save or []
    if not saved:
        return False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(layer_config(model_config, 8))
    embedding = model.get_input_embeddings()
    name = next((n for n, module in model.named_modules() if module is embedding), "")
    return any(name == wanted or name.endswith("." + wanted) for wanted in saved)


def _step_work(model, lengths: list[int], budget: int, precision: str, device: torch.device) -> Callable[[], None]:
    """Forward and backward of the step's samples in the sub-batches `budget` makes (0: one sample at a time)."""
    groups = [[row] for row in range(len(lengths))] if budget <= 0 else split_by_tokens(lengths, budget)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for group in groups:
        width = max(lengths[row] for row in group)
        ids = torch.randint(0, min(512, model.get_input_embeddings().num_embeddings), (len(group), width),
                            generator=generator)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for index, row in enumerate(group):
            mask[index, : lengths[row]] = 1
        batches.append((ids.to(device), mask.to(device)))
    body = model.base_model
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

    def work(first_only: bool = False) -> None:
        for ids, mask in batches[:1] if first_only else batches:
            with autocast:
                hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return work


def _head_work(hidden_size: int, vocab: int, precision: str, fused: bool, device: torch.device) -> Callable[[], None]:
    """lm_head + cross-entropy over HEAD_ROWS supervised rows on a vocabulary slice, backward to the hidden states."""
    from loraft.loss import supervised_cross_entropy

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(device)
    if precision != "fp32":
        weight = weight.to(DTYPES[precision])
    hidden = torch.randn(1, HEAD_ROWS + 1, hidden_size, generator=generator).to(device).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, HEAD_ROWS + 1), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

    def work() -> None:
        with autocast:
            if fused:
                loss = supervised_cross_entropy(hidden, labels, weight)
            else:
                logits = torch.nn.functional.linear(hidden, weight).float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
        loss.backward()
        hidden.grad = None

    return work


def _optimizer_work(name: str, device: torch.device) -> Callable[[], None]:
    parameters = [torch.nn.Parameter(torch.zeros(OPTIMIZER_PARAMETERS // 4, device=device)) for _ in range(4)]
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 1e-3)
    fused = name == "adamw_torch_fused"
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=fused, foreach=None if fused else True)
    return optimizer.step


def _own_attention(config: RunConfig, model_config: Any, has_patch: bool) -> Optional[str]:
    """The family's own attention, as a candidate label: its patch, else the library's default where that is not
    eager (sdpa: on some CPUs its backward at short lengths costs many times eager's); None: eager is all there is."""
    if has_patch:
        return "patch"
    if config.model.attn_implementation is None and library_default_attention(model_config) != "eager":
        return "default"
    return None


def measure_attention(config: RunConfig, precision: str, model_config: Any, device: str = "cpu",
                      log: Callable[[str], None] = logger.info) -> dict:
    """For an objective TRL's trainer runs (its batch, its loss): only the attention, the family's own against
    eager, over one batch as TRL forwards it (`trl_batch_lengths`), timed in turns; cached like `measure`.

    Returns:
        {"key", "seconds", "layouts": {label: s}, "choice": {"attention": "eager" | "patch" | "library"}}
    """
    key = tuning_key(config, precision, model_config)
    shape = key["shape"]
    target = torch.device(device)
    lengths = key["lengths"]
    own = _own_attention(config, model_config, patches_on_load(str(shape["model_type"]),
                                                              config.model.attn_implementation))
    started = time.perf_counter()
    layouts: dict[str, float] = {}
    choice = {"attention": "patch" if own == "patch" else "library"}
    if own is not None:
        log(f"autotune: measuring the attention at {shape['model_type']} width {shape['hidden_size']} ({precision}, "
            f"once per machine and shape)")
        whole = sum(lengths)  # one padded batch, as TRL collates it
        works = {name: _step_work(one_layer_model(model_config, precision, name, target, 512), lengths, whole,
                                  precision, target) for name in (own, "library")}
        for work in works.values():
            work(first_only=True)
        best = {name: float("inf") for name in works}
        for _ in range(LAYOUT_ROUNDS):
            for name, work in works.items():
                best[name] = min(best[name], timed(work, repeats=1))
        layouts = {f"{name}/{whole}": round(seconds, 4) for name, seconds in best.items()}
        if best["library"] < best[own] * (1 - MARGIN):
            choice = {"attention": "eager"}
    result = {"key": json.loads(json.dumps(key, default=str)), "seconds": round(time.perf_counter() - started, 1),
              "layouts": layouts, "choice": choice}
    log(f"autotune: {result['seconds']} s; attention {choice['attention']}")
    store_measurement("tune", result)
    return result


def _predict(measured: dict, layers: int, vocab_scale: float, step_rows: int) -> float:
    return layers * measured["layout"] + measured["head"] * vocab_scale * step_rows / HEAD_ROWS


def measure(config: RunConfig, precision: str, model_config: Any, device: str = "cpu",
            log: Callable[[str], None] = logger.info) -> dict:
    """Measure the candidates (see the module docstring), cache the result and return it.

    Returns:
        {"key", "seconds", "layouts": {label: s}, "head": {"full"|"fused": s}, "optimizer": {name: s},
         "choice": {"micro_batch_tokens", "attention", "fused_loss", "optimizer"}, "predicted_step": {...}}
    """
    key = tuning_key(config, precision, model_config)
    shape = key["shape"]
    target = torch.device(device)
    lengths = step_lengths(config)
    has_patch = patches_on_load(str(shape["model_type"]), config.model.attn_implementation)
    started = time.perf_counter()
    log(f"autotune: measuring the speed choices at {shape['model_type']} width {shape['hidden_size']} "
        f"({precision}, once per machine and shape, at most ~{BUDGET_SECONDS:.0f} s)")

    vocab = int(shape["vocab_size"] or VOCAB_SLICE)
    embedding_vocab = vocab if key["trains_embedding"] else 512
    own = _own_attention(config, model_config, has_patch)  # "library" is eager, the reference's attention
    models = {name: one_layer_model(model_config, precision, name, target, embedding_vocab)
              for name in ([own] if own else []) + ["library"]}

    # the reference's path first: the candidate to beat. Sub-batches only up to the static budget, whose
    # activations stay within the reference's memory; none smaller than one whole sample of max_length.
    cap = micro_batch_budget("auto", precision, config.data.max_length)
    sizes = sorted({size for size in (cap // 4, cap // 2, cap) if size >= config.data.max_length} | {cap})
    # a size that leaves every sample in a sub-batch of its own is the one-sample layout again: not timed twice
    sizes = [size for size in sizes if any(len(group) > 1 for group in split_by_tokens(lengths, size))]
    candidates = [("library", 0)] + [(name, budget) for name in ([own] if own else []) + ["library"]
                                     for budget in [0] + sizes if (name, budget) != ("library", 0)]
    works = {candidate: _step_work(models[candidate[0]], lengths, candidate[1], precision, target)
             for candidate in candidates}
    for work in works.values():
        work(first_only=True)  # warm-up: kernel selection, allocator
    # every candidate timed once per round, in turns, so a busy moment of the machine does not fall on one of
    # them only; the best of the rounds counts, and rounds stop at the budget (the first always completes)
    best_of = {candidate: float("inf") for candidate in candidates}
    for round_index in range(LAYOUT_ROUNDS):
        round_started = time.perf_counter()
        for candidate, work in works.items():
            best_of[candidate] = min(best_of[candidate], timed(work, repeats=1))
        # another round only if it ends within the budget (leaving room for the loss and optimizer timings)
        if time.perf_counter() + (time.perf_counter() - round_started) - started > 0.85 * BUDGET_SECONDS:
            break
    layouts = {f"{name}/{budget}": round(seconds, 4) for (name, budget), seconds in best_of.items()}
    recipe = best_of[("library", 0)]
    # the static default (the family's attention, the static budget; a budget that leaves every sample alone
    # computes what the one-sample layout computes) is kept unless the measurement clearly says otherwise:
    # the reference's path when the default is clearly slower than it, another candidate when clearly faster
    default_attention = own or "library"
    static = (default_attention, cap)
    static_seconds = best_of.get(static, best_of[(default_attention, 0)])
    fastest = min(best_of, key=best_of.get)
    if static_seconds > recipe * (1 + MARGIN):
        choice = ("library", 0)
    elif best_of[fastest] < static_seconds * (1 - MARGIN):
        choice = fastest
    else:
        choice = static
    best = (best_of.get(choice, static_seconds), *choice)

    # the two losses timed in turns, so a busy moment does not fall on one of them only
    head_works = {name: _head_work(int(shape["hidden_size"]), min(vocab, VOCAB_SLICE), precision, fused, target)
                  for name, fused in (("full", False), ("fused", True))}
    head = {name: float("inf") for name in head_works}
    for _ in range(HEAD_ROUNDS):
        for name, work in head_works.items():
            head[name] = min(head[name], timed(work, repeats=1))
    head = {name: round(seconds, 5) for name, seconds in head.items()}
    optimizer: dict[str, float] = {}
    for name in ("adamw_torch_fused", "adamw_torch"):
        work = _optimizer_work(name, target)
        work()
        optimizer[name] = round(timed(work), 5)

    # per row the two cost about the same; the fused loss computes only the supervised rows (instruction data masks
    # its prompts), so it pays unless it is clearly slower per row
    fused_loss = head["fused"] * SUPERVISED_SHARE <= head["full"] * (1 + MARGIN)
    chosen_optimizer = min(optimizer, key=optimizer.get)
    if optimizer["adamw_torch_fused"] <= optimizer[chosen_optimizer] * (1 + MARGIN):
        chosen_optimizer = "adamw_torch_fused"  # Trainer's own default unless the other clearly wins
    layers = int(shape["layers"] or 1)
    scale, rows = max(vocab, 1) / min(vocab, VOCAB_SLICE), sum(lengths)
    predicted = {
        "recipe": round(_predict({"layout": recipe, "head": head["full"]}, layers, scale, rows), 2),
        "chosen": round(_predict({"layout": best[0], "head": head["fused" if fused_loss else "full"]}, layers,
                                 scale, rows), 2),
    }
    result = {
        "key": json.loads(json.dumps(key, default=str)), "seconds": round(time.perf_counter() - started, 1),
        "layouts": layouts, "head": head, "optimizer": optimizer,
        # "eager": chosen over the family's own attention (its patch or the library's sdpa); "library": the
        # library's default as it is
        "choice": {"micro_batch_tokens": best[2], "attention": "eager" if best[1] == "library" and own
                   else "patch" if best[1] == "patch" else "library", "fused_loss": fused_loss,
                   "optimizer": chosen_optimizer},
        "predicted_step": predicted,
    }
    log(f"autotune: {result['seconds']} s; sub-batches {best[2] or 'one sample at a time'}, attention "
        f"{result['choice']['attention']}, fused loss {'yes' if fused_loss else 'no'}, {chosen_optimizer}; "
        f"predicted step {predicted['chosen']} s vs the recipe's {predicted['recipe']} s")
    store_measurement("tune", result)
    return result
