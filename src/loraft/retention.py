"""Retention: what a fine-tune left of the base model's general behaviour, measured on the project's general prompts.

Two measures, both against the run's own base (the adapter switched off: no second copy of the weights):
- **general accuracy**: the base and the run answer the checkable prompts (greedy, the run's template); a reply is
  correct when it contains an accepted answer (loraft.retention_check.is_correct);
- **KL per token**: the mean KL divergence from the base's next-token distribution to the run's, over the tokens of
  the base's own answers to every prompt (teacher-forced, no generation by the run). 0 is the base's behaviour
  unchanged; it needs no checkable answer, so chat prompts count too.

The base's answers depend only on the base, the template, the prompts and the generation length: they are generated
once and cached under `$LORAFT_HOME/retention/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from loraft.encode import right_pad_scored
from loraft.files import cache_dir, model_fingerprint, write_text_atomically
from loraft.generate import encode_prompt, generate_answers
from loraft.model import takes_logits_to_keep
from loraft.retention_check import is_correct, load_prompts

logger = logging.getLogger("loraft")
RETENTION_TOKENS = 48  # answer length for the general prompts: their checkable answers come in the first words


def _cache_file(config, template, prompts: Sequence[dict], max_new_tokens: int, dtype: str) -> Path:
    parts = {"model": model_fingerprint(config.model.name_or_path, config.model.revision), "dtype": dtype,
             "template": hashlib.sha256(template.jinja.encode()).hexdigest(),
             "prompts": hashlib.sha256(json.dumps([p["prompt"] for p in prompts]).encode()).hexdigest(),
             "max_new_tokens": max_new_tokens, "version": 2}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir("retention") / f"{key}.json"


def base_answers(model, tokenizer, template, prompts: Sequence[dict], settings, batch_size: int, cache: Path) -> list:
    """The base's greedy answers to the prompts (adapter off), from the cache when this base, template and prompt
    set were answered before: [{"text", "ids"}] (ids: the tokens it generated, with its end token, if it ended)."""
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    with model.disable_adapter():
        answers = generate_answers(model, tokenizer, template, conversations, settings, batch_size, progress=True)
    rows = [{"text": a.text, "ids": list(a.ids)} for a in answers]  # what the base generated, its end token too
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(cache, json.dumps(rows, ensure_ascii=False))
    except OSError as exc:
        logger.warning("could not cache the base's answers in %s (%s)", cache, exc)
    return rows


@contextlib.contextmanager
def _each_adapter(model, adapters: Optional[Sequence[str]]):
    """The names to measure: `adapters` (the caller activates each in turn; the adapter active before is restored
    at the end), or [None] for the active adapter alone."""
    if adapters is None:
        yield [None]
        return
    active = model.active_adapter
    try:
        yield list(adapters)
    finally:
        model.set_adapter(active)


@torch.inference_mode()
def kl_per_token(model, tokenizer, template, prompts: Sequence[dict], answers: Sequence[dict], batch_size: int,
                 adapters: Optional[Sequence[str]] = None):
    """Mean KL(base || run) per answer token, teacher-forced on the base's answers (the run = the adapter on).

    Rows of similar length share a batch, and the logits are computed at the positions that predict an answer
    token only (`logits_to_keep`): the prompts' positions need the layers, not the vocabulary. With `adapters`
    (names of adapters the PeftModel holds) each is measured against the same base forward and a dict
    {adapter: KL} is returned; the active adapter is restored.
    """
    device = next(model.parameters()).device
    rows = []
    for prompt, answer in zip(prompts, answers):
        prefix = encode_prompt(tokenizer, template, [{"role": "user", "content": prompt["prompt"]}])
        if answer["ids"]:
            rows.append((prefix + answer["ids"], len(prefix) - 1))  # the prompt's last position predicts the answer
    rows.sort(key=lambda row: -len(row[0]))  # similar lengths together: little padding
    keep_positions = takes_logits_to_keep(model)
    with _each_adapter(model, adapters) as names:
        totals, count = {name: 0.0 for name in names}, 0
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            input_ids, mask, scored = right_pad_scored(batch, tokenizer.pad_token_id)
            first = min(first for _, first in batch)  # no position before it is scored
            kept = torch.arange(first, input_ids.shape[1], device=device)
            kwargs = {"logits_to_keep": kept} if keep_positions else {}
            scored = (scored[:, first:] if keep_positions else scored).to(device)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), **kwargs}

            def log_probs() -> torch.Tensor:
                return torch.log_softmax(model(**inputs).logits[scored].float(), dim=-1)

            with model.disable_adapter():
                base = log_probs()
            for name in names:
                if name is not None:
                    model.set_adapter(name)
                totals[name] += float((base.exp() * (base - log_probs())).sum())
            count += int(scored.sum())
    means = {name: total / count if count else 0.0 for name, total in totals.items()}
    return means if adapters is not None else means[None]


def measure_retention(model, tokenizer, template, config, settings, dtype: str, batch_size: int = 8,
                      limit: Optional[int] = None, adapters: Optional[Sequence[str]] = None) -> dict:
    """General accuracy of the base and of the run, and the KL per token from base to run, on the project's
    general prompts (the first `limit` of them).

    Args:
        model: the run's PeftModel (the base is the adapter switched off).
        config: the run's config (its base model names the cache entry).
        settings: generation settings (greedy; max_new_tokens is RETENTION_TOKENS unless given).
        adapters: several adapters of `model` measured against one base (its answers and its KL forward shared):
            the result is then {adapter: result}. None: the active adapter.
    Returns:
        {"prompts", "checkable", "base_accuracy", "accuracy", "kept" (accuracy / base_accuracy), "kl_per_token",
         "by_language": {lang: {"checkable", "base_accuracy", "accuracy"}}, "samples": [...]} (accuracies in %).
    """
    prompts = load_prompts()[:limit] if limit else load_prompts()
    cache = _cache_file(config, template, prompts, settings.max_new_tokens, dtype)
    base = base_answers(model, tokenizer, template, prompts, settings, batch_size, cache)
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    runs = {}
    with _each_adapter(model, adapters) as names:
        for name in names:
            if name is not None:
                model.set_adapter(name)
            runs[name] = generate_answers(model, tokenizer, template, conversations, settings, batch_size,
                                          progress=True)
    kl = kl_per_token(model, tokenizer, template, prompts, base, batch_size, adapters)
    checkable = [i for i, p in enumerate(prompts) if p["answers"]]

    def accuracy(indexes: list[int], texts: Sequence[str]) -> float:
        right = sum(is_correct(texts[i], prompts[i]["answers"]) for i in indexes)
        return round(100.0 * right / len(indexes), 2) if indexes else 0.0

    base_texts = [b["text"] for b in base]
    results = {}
    for name in names:
        run_texts = [a.text for a in runs[name]]
        by_language = {}
        for lang in sorted({p["lang"] for p in prompts}):
            indexes = [i for i in checkable if prompts[i]["lang"] == lang]
            by_language[lang] = {"checkable": len(indexes), "base_accuracy": accuracy(indexes, base_texts),
                                 "accuracy": accuracy(indexes, run_texts)}
        base_accuracy, run_accuracy = accuracy(checkable, base_texts), accuracy(checkable, run_texts)
        results[name] = {
            "prompts": len(prompts), "checkable": len(checkable), "base_accuracy": base_accuracy,
            "accuracy": run_accuracy, "kept": round(run_accuracy / base_accuracy, 3) if base_accuracy else None,
            "kl_per_token": round(kl[name] if adapters is not None else kl, 5),
            "by_language": by_language, "max_new_tokens": settings.max_new_tokens,
            "samples": [{"id": prompts[i]["id"], "prompt": prompts[i]["prompt"], "answers": prompts[i]["answers"],
                         "base": base_texts[i], "run": run_texts[i]} for i in checkable[:8]],
        }
        logger.info("retention%s: general accuracy %.2f%% -> %.2f%%, KL per token %.4f",
                    f" ({name})" if name else "", base_accuracy, run_accuracy, results[name]["kl_per_token"])
    return results if adapters is not None else results[None]


def retention_of_run(model, tokenizer, template, info: dict, batch_size: int, limit: Optional[int]) -> dict:
    """measure_retention for a run loaded by loraft.generate.load_run (greedy, RETENTION_TOKENS)."""
    from loraft.generate import cli_flag, resolve_generation

    settings = resolve_generation(info["config"].generation, {"temperature": 0.0, "max_new_tokens": RETENTION_TOKENS},
                                  label=cli_flag)
    return measure_retention(model, tokenizer, template, info["config"], settings, info["dtype"], batch_size, limit)


def evaluate_retention(run, run_dir: Path, batch_size: int, device: Optional[str], limit: Optional[int]) -> dict:
    """`loraft eval RUN` without --data: retention alone, written to eval/metrics.json."""
    from loraft.generate import load_run
    from loraft.rundir import EVAL_METRICS, RunDir

    model, tokenizer, template, info = load_run(run, device=device)
    metrics = {"run_dir": str(run_dir), "template": template.name,
               "retention": retention_of_run(model, tokenizer, template, info, batch_size, limit)}
    out_dir = RunDir(run_dir).eval_dir
    out_dir.mkdir(exist_ok=True)
    write_text_atomically(out_dir / EVAL_METRICS, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics


def format_retention(retention: dict) -> str:
    """Two lines for the eval table: general accuracy base -> run, and the KL per token."""
    kept = f" ({100 * retention['kept']:.0f}% of the base's)" if retention.get("kept") is not None else ""
    return (f"retention on {retention['prompts']} general prompts ({retention['checkable']} checkable): accuracy "
            f"{retention['base_accuracy']:.2f}% -> {retention['accuracy']:.2f}%{kept}; KL from the base "
            f"{retention['kl_per_token']:.4f} per token")
