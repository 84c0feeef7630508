"""Evaluate a run on held-out records: loss, perplexity, exact match, and Chinese ROUGE/BLEU.

`evaluate` answers every record's prompt with the run's template (greedy, batched) and scores the answer
against the record's last assistant turn. It reports what Chinese fine-tuning papers and LLaMA-Factory
report: ROUGE-1/2/L F1 and BLEU-4 (NLTK's `sentence_bleu` with smoothing method 3), each over jieba words
and over characters, plus teacher-forced loss and perplexity on the references with the training masks.
With `base=True` the same records are scored with the adapter switched off, so the table shows before
and after. Results go to `RUN_DIR/eval/predictions.jsonl` and `RUN_DIR/eval/metrics.json`.
Preference records (chosen/rejected pairs, or unpaired completions with a label) get preference accuracy
instead: loraft.evaluate_preference; a GRPO run's prompt records its rewards' means and pass@1:
loraft.evaluate_rewards.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from loraft.errors import DataError, RunError
from loraft.rundir import RunDir
from loraft.text_metrics import average_scores, text_scores


# --- model metrics -----------------------------------------------------------------------------------


def tokenize_references(tokenizer, template, conversations: Sequence[dict], max_length: int) -> tuple[list[dict], dict]:
    """input_ids/labels of each full conversation, masked and truncated by the data stage as for training.

    Returns:
        (samples, the data stage's token report); samples with no answer token left are dropped, as in training.
    """
    from loraft.data import tokenize_conversations

    dataset, report = tokenize_conversations(conversations, tokenizer, template, max_length)
    samples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(dataset["input_ids"], dataset["labels"])]
    return samples, report


@torch.inference_mode()
def reference_loss(model, tokenizer, samples: Sequence[dict], batch_size: int = 8, progress: bool = False) -> dict:
    """Teacher-forced loss on the supervised (answer) tokens, averaged over tokens like the Trainer's.

    Returns:
        {"loss", "perplexity", "supervised_tokens"}
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    batches = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    for batch in tqdm(batches, desc="loss", unit="batch", disable=not progress):
        width = max(len(s["input_ids"]) for s in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sample in enumerate(batch):
            length = len(sample["input_ids"])
            input_ids[row, :length] = torch.tensor(sample["input_ids"])
            labels[row, :length] = torch.tensor(sample["labels"])
            attention_mask[row, :length] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shifted_labels = labels[:, 1:].reshape(-1).to(device)
        total_nll += torch.nn.functional.cross_entropy(
            shifted_logits, shifted_labels, ignore_index=-100, reduction="sum"
        ).item()
        total_tokens += int((shifted_labels != -100).sum())
    if total_tokens == 0:
        return {"loss": None, "perplexity": None, "supervised_tokens": 0}
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "supervised_tokens": total_tokens}


# --- the stage ---------------------------------------------------------------------------------------


def held_out_format(data_path: str | Path, data_config) -> str:
    """The record format of held-out data: detected from its first record with the run's field names, or the run's
    own data.format where that reads the same kind of records (SFT or preference); a DPO run's preference_alpaca
    does not read SFT records, nor an SFT run's alpaca preference pairs."""
    from loraft.records import PREFERENCE_FORMATS, source_format

    configured = data_config.format
    try:
        detected = source_format(str(data_path), data_config.model_copy(update={"format": "auto"}))
    except DataError:
        if configured == "auto":
            raise
        return configured  # its own reader names the bad record and field
    if configured == "auto" or (configured in PREFERENCE_FORMATS) != (detected in PREFERENCE_FORMATS):
        return detected
    return configured


def load_eval_records(data_path: str | Path, data_config, limit: Optional[int] = None) -> list[dict]:
    """Held-out conversations split into the prompt (all but the last turn) and the reference answer."""
    from loraft.records import load_conversations

    settings = data_config.model_copy(
        update={"path": str(data_path), "limit": limit, "eval_path": None, "eval_fraction": 0.0}
    )
    records = []
    for record in load_conversations(str(data_path), settings):
        messages = record["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            source = str(record.get("source") or "")
            where = source[len(f"{data_path}, "):] if source.startswith(f"{data_path}, ") else source or None
            raise DataError(str(data_path), "the last message must be the assistant's reference answer",
                            where=where, field="messages")
        records.append({"source": record.get("source"), "messages": messages,
                        "prompt": messages[:-1], "reference": messages[-1]["content"]})
    if not records:
        raise DataError(str(data_path), "holds no records to evaluate")
    return records


def _score_model(model, tokenizer, template, records, samples, settings, batch_size: int, label: str) -> tuple[dict, list[str]]:
    from loraft.generate import generate_batch

    predictions = generate_batch(
        model, tokenizer, template, [r["prompt"] for r in records], settings, batch_size=batch_size, progress=True
    )
    per_record = [text_scores(p, r["reference"]) for p, r in zip(predictions, records)]
    metrics = {**reference_loss(model, tokenizer, samples, batch_size, progress=True), **average_scores(per_record)}
    logging.getLogger("loraft").info("%s: loss %s, exact match %.2f%%", label, metrics["loss"], metrics["exact_match"])
    return metrics, predictions


def evaluate(
    run_dir: str | Path,
    data_path: Optional[str | Path],
    limit: Optional[int] = None,
    base: bool = False,
    batch_size: int = 8,
    max_new_tokens: Optional[int] = None,
    device: Optional[str] = None,
    access=None,
    retention: bool = True,
    retention_limit: Optional[int] = None,
) -> dict:
    """Score a finished run on held-out data and write `eval/predictions.jsonl` and `eval/metrics.json`.

    Args:
        run_dir: a finished run directory.
        data_path: held-out records in any format the data stage reads; the last assistant turn of each
            record is the reference answer. Preference records are scored by evaluate_preference instead.
        limit: evaluate only the first N records.
        base: also score the base model (adapter disabled) with the same template and records; on preference
            records the run's starting point (its model.adapter_from run, else the base).
        batch_size: prompts per generation / loss batch.
        max_new_tokens: most tokens per answer (default: the run's generation.max_new_tokens).
        retention: also measure what the run kept of its base on the project's general prompts (loraft.retention:
            general accuracy before and after, KL per token); None data_path: that alone.
        retention_limit: the first N general prompts only.
    Returns:
        the metrics written to metrics.json: {"adapter": {...}, "base": {...} (with base), ...}, or on preference
        records {..., "preference": {"adapter": {...}, "reference": {...} (with base)}}.
    """
    from loraft.generate import cli_flag, load_run, resolve_generation

    run_dir = Path(run_dir)
    if batch_size <= 0:
        raise RunError(f"--batch-size must be > 0 (got {batch_size})")
    if limit is not None and limit <= 0:
        raise RunError(f"--limit must be > 0 (got {limit})")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise RunError(f"--max-new-tokens must be > 0 (got {max_new_tokens})")
    from loraft.run_access import RunAccess, open_run

    from loraft.records import PREFERENCE_FORMATS

    run = open_run(run_dir, access or RunAccess())
    if data_path is None:
        if not retention:
            raise RunError("nothing to evaluate: give --data FILE, or leave retention on")
        from loraft.retention import evaluate_retention

        return evaluate_retention(run, run_dir, batch_size, device, retention_limit)
    if run.config.train.objective == "grpo":  # prompt records, scored by the run's rewards
        from loraft.evaluate_rewards import evaluate_rewards

        return evaluate_rewards(run, run_dir, data_path, limit=limit, base=base, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, device=device, retention=retention,
                                retention_limit=retention_limit)
    data_config = run.config.data.model_copy(update={"format": held_out_format(data_path, run.config.data)})
    if data_config.format in PREFERENCE_FORMATS:
        from loraft.evaluate_preference import evaluate_preferences

        return evaluate_preferences(run, data_path, data_config, RunDir(run_dir).eval_dir, limit=limit, base=base,
                                    batch_size=batch_size, device=device, access=access, retention=retention,
                                    retention_limit=retention_limit)
    # Read the data before loading the model, so a bad file fails in a second.
    records = load_eval_records(data_path, data_config, limit)
    model, tokenizer, template, info = load_run(run, device=device)
    config = info["config"]
    samples, token_report = tokenize_references(
        tokenizer, template, [{"messages": r["messages"]} for r in records], config.data.max_length
    )
    # greedy: scores are reproducible; the rest of the run's generation.* stays
    settings = resolve_generation(config.generation, {"temperature": 0.0, "max_new_tokens": max_new_tokens},
                                  label=cli_flag)

    adapter_metrics, predictions = _score_model(
        model, tokenizer, template, records, samples, settings, batch_size, "adapter"
    )
    base_metrics, base_predictions = None, None
    if base:
        # peft switches LoRA layers and modules_to_save copies back to the frozen base weights here.
        with model.disable_adapter():
            base_metrics, base_predictions = _score_model(
                model, tokenizer, template, records, samples, settings, batch_size, "base"
            )

    metrics = {
        "run_dir": str(run_dir),
        "data": str(data_path),
        "records": len(records),
        "template": template.name,
        "loss_samples": len(samples),
        "truncated_samples": token_report.get("truncated_samples"),
        "generation": {"decoding": "greedy", "max_new_tokens": settings.max_new_tokens},
        "metrics_note": "percent; ROUGE F1 and BLEU-4 (NLTK method-3 smoothing), macro-averaged over records",
        "adapter": adapter_metrics,
    }
    if base_metrics is not None:
        metrics["base"] = base_metrics
    if retention:
        from loraft.retention import retention_of_run

        metrics["retention"] = retention_of_run(model, tokenizer, template, info, batch_size, retention_limit)

    rows = []
    for index, record in enumerate(records):
        row = {"source": record["source"], "prompt": record["prompt"], "reference": record["reference"],
               "prediction": predictions[index]}
        if base_predictions is not None:
            row["base_prediction"] = base_predictions[index]
        rows.append(row)
    return RunDir(run_dir).write_eval(rows, metrics)


TABLE_ROWS = [
    ("loss", ("loss",), "{:.4f}"),
    ("perplexity", ("perplexity",), "{:.2f}"),
    ("exact match %", ("exact_match",), "{:.2f}"),
    ("ROUGE-1 words", ("words", "rouge-1"), "{:.2f}"),
    ("ROUGE-2 words", ("words", "rouge-2"), "{:.2f}"),
    ("ROUGE-L words", ("words", "rouge-l"), "{:.2f}"),
    ("BLEU-4 words", ("words", "bleu-4"), "{:.2f}"),
    ("ROUGE-1 chars", ("chars", "rouge-1"), "{:.2f}"),
    ("ROUGE-2 chars", ("chars", "rouge-2"), "{:.2f}"),
    ("ROUGE-L chars", ("chars", "rouge-l"), "{:.2f}"),
    ("BLEU-4 chars", ("chars", "bleu-4"), "{:.2f}"),
]


def format_table(metrics: dict) -> str:
    """The metrics as a plain-text table: one row per metric, base and adapter side by side."""
    from loraft.retention import format_retention

    retention = [format_retention(metrics["retention"])] if "retention" in metrics else []
    if "rewards" in metrics:
        from loraft.evaluate_rewards import format_rewards_table

        return "\n".join([format_rewards_table(metrics)] + retention)
    if "preference" in metrics:
        from loraft.evaluate_preference import format_preference_table

        return "\n".join([format_preference_table(metrics)] + retention)
    if "records" not in metrics:  # retention alone
        return "\n".join(retention)
    columns = (["base"] if "base" in metrics else []) + ["adapter"]
    lines = [f"{metrics['records']} records from {metrics['data']} ({metrics['template']} template, greedy)",
             f"{'metric':16}" + "".join(f"{name:>12}" for name in columns)]
    for label, path, fmt in TABLE_ROWS:
        cells = []
        for column in columns:
            value = metrics[column]
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            cells.append(f"{fmt.format(value) if value is not None else '-':>12}")
        lines.append(f"{label:16}" + "".join(cells))
    return "\n".join(lines + retention)
