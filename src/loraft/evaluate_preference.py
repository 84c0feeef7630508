"""Preference accuracy: does a run prefer the chosen completion to the rejected one, and by how much?

`evaluate_preferences` is what `loraft eval RUN --data FILE` runs when FILE holds preference records (chosen and
rejected, or an unpaired completion with a label). Each completion is scored by the log-probability the model gives
its tokens after the prompt (the tokens TRL trains on: loraft.preference encodes them as SFT encodes the answer),
in fp32, and turned into the reward the run's objective optimises, as TRL 1.16 logs it:

    dpo, kto   implicit reward       beta * (sum log p_run(y|x) - sum log p_ref(y|x))
    orpo       mean log-probability  beta * mean log p_run(y|x) per completion token (reference-free)
    sft        log-probability       sum log p_run(y|x)

The reference is the run's starting point: its `model.adapter_from` run's adapter, loaded as a second peft adapter
on the same model (so the base weights are held once, as TRL does with its "ref" adapter), else the base with the
adapter disabled. With `base=True` the reference is scored too; against itself its implicit reward is 0, so its
column is by log-probability. Ties count as not preferring.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from loraft.errors import RunError
from loraft.files import write_text_atomically
from loraft.rundir import EVAL_METRICS, EVAL_PREDICTIONS

REFERENCE_ADAPTER = "reference"  # the peft adapter name the adapter_from run's adapter is loaded under
IMPLICIT_REWARD, LOG_PROBABILITY, MEAN_LOG_PROBABILITY = "implicit reward", "log-probability", "mean log-probability"
MEASURES = {"dpo": IMPLICIT_REWARD, "kto": IMPLICIT_REWARD, "orpo": MEAN_LOG_PROBABILITY, "sft": LOG_PROBABILITY}


@dataclass(frozen=True)
class Reference:
    """Where the run's reference model is: a peft adapter on the run's model, or (adapter None) the base with the
    adapter disabled."""

    adapter: Optional[str]
    description: str


def describe_reference(config) -> str:
    """The run's reference in words: its model.adapter_from run, or the base with the adapter disabled."""
    adapter_from = config.model.adapter_from
    return "the base model, adapter disabled" if adapter_from is None else f"{adapter_from} (model.adapter_from)"


def load_preference_model(run, device: Optional[str] = None, access=None, with_reference: bool = True):
    """The run's model, with its reference on the same base weights.

    Args:
        run: a UsableRun (loraft.run_access.open_run).
        access: RunAccess; its trust_remote_code also applies to the adapter_from run.
        with_reference: False loads no reference adapter (an orpo or sft run scored without --base needs none).
    Returns:
        (peft_model in eval mode, tokenizer, template, Reference or None, run_info as loraft.generate.load_run's)
    """
    from loraft.generate import load_run
    from loraft.run_access import RunAccess, open_run

    adapter_from = run.config.model.adapter_from if with_reference else None
    source = None
    if adapter_from is not None:  # checked before the model loads, so a wrong path fails in a second
        try:
            source = open_run(adapter_from, RunAccess(trust_remote_code=bool(access and access.trust_remote_code)))
        except RunError as exc:
            raise RunError(f"{run.run_dir}: its reference (model.adapter_from in config.yaml) cannot be used: "
                           f"{exc}") from None
        if source.config.model.name_or_path != run.config.model.name_or_path:
            raise RunError(f"{run.run_dir}: its reference {adapter_from} (model.adapter_from) was trained on "
                           f"{source.config.model.name_or_path}, not on this run's base "
                           f"{run.config.model.name_or_path}")
    model, tokenizer, template, info = load_run(run, device=device)
    if not with_reference:
        return model, tokenizer, template, None, info
    description = describe_reference(run.config)
    if source is None:
        return model, tokenizer, template, Reference(None, description), info
    model.load_adapter(str(source.adapter_dir), adapter_name=REFERENCE_ADAPTER)
    model.eval()
    return model, tokenizer, template, Reference(REFERENCE_ADAPTER, description), info


@contextlib.contextmanager
def reference_active(model, reference: Reference):
    """Within this block `model` computes the reference; the run's own adapter is active again after it."""
    if reference.adapter is None:
        # peft switches LoRA layers and modules_to_save copies back to the frozen base weights here.
        with model.disable_adapter():
            yield
        return
    own = model.active_adapter
    model.set_adapter(reference.adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(own, inference_mode=True)


@torch.inference_mode()
def completion_logprobs(model, sequences: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                        batch_size: int = 8, progress: bool = False,
                        label: str = "log-probs") -> list[tuple[float, int]]:
    """Summed log-probability of each completion's tokens given its prompt, computed in fp32, batched with padding.

    Args:
        sequences: (prompt_ids, completion_ids) pairs.
    Returns:
        (sum of log p over the completion's tokens, number of those tokens), in the order of `sequences`.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    # longest first, so a batch pads little; results go back to their places
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]) - len(sequences[i][1]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=label, unit="batch", disable=not progress):
        width = max(len(sequences[i][0]) + len(sequences[i][1]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)  # completion tokens only: prompt masked
        for row, index in enumerate(batch):
            prompt, completion = sequences[index]
            length = len(prompt) + len(completion)
            input_ids[row, :length] = torch.tensor(prompt + completion)
            attention_mask[row, :length] = 1
            targets[row, len(prompt):length] = torch.tensor(completion)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        # a prompt-tuning adapter prepends its virtual tokens: the sequence's own positions are the last `width`
        logits = logits[:, -width:-1].float()
        labels = targets[:, 1:].to(device)
        supervised = labels != -100
        picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_logprobs = torch.where(supervised, picked - torch.logsumexp(logits, dim=-1), 0.0)
        for row, index in enumerate(batch):
            results[index] = (float(token_logprobs[row].sum()), int(supervised[row].sum()))
    return results


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def rewards(measure: str, own: Sequence[tuple[float, int]], reference: Optional[Sequence[tuple[float, int]]],
            beta: float) -> list[float]:
    """Each completion's reward by `measure`, from completion_logprobs of the model (and of its reference)."""
    if measure == IMPLICIT_REWARD:
        return [beta * (logprob - ref_logprob) for (logprob, _), (ref_logprob, _) in zip(own, reference)]
    if measure == MEAN_LOG_PROBABILITY:
        return [beta * logprob / max(tokens, 1) for logprob, tokens in own]
    return [logprob for logprob, _ in own]


def pair_summary(measure: str, chosen: Sequence[float], rejected: Sequence[float], chosen_logprobs: Sequence[float],
                 rejected_logprobs: Sequence[float]) -> dict:
    """One model's numbers on pairs: accuracy (share with reward chosen > rejected; a tie is no preference), the
    mean margin and rewards, and logprob_accuracy (the same by summed log-probability)."""
    return {
        "measure": measure, "pairs": len(chosen),
        "accuracy": _mean([float(c > r) for c, r in zip(chosen, rejected)]),
        "margin": _mean([c - r for c, r in zip(chosen, rejected)]),
        "reward_chosen": _mean(chosen), "reward_rejected": _mean(rejected),
        "logprob_accuracy": _mean([float(c > r) for c, r in zip(chosen_logprobs, rejected_logprobs)]),
    }


def unpaired_summary(measure: str, completion_rewards: Sequence[float], labels: Sequence[bool]) -> dict:
    """One model's numbers on unpaired completions: no pair accuracy; label_accuracy is the share whose implicit
    reward has the label's sign (> 0 desirable, < 0 undesirable); a log-probability has no such sign (None)."""
    signed = measure == IMPLICIT_REWARD
    return {
        "measure": measure, "completions": len(labels), "accuracy": None, "accuracy_note": "no pairs",
        "label_accuracy": _mean([float(r > 0 if label else r < 0) for r, label in zip(completion_rewards, labels)])
        if signed else None,
        "reward_desirable": _mean([r for r, label in zip(completion_rewards, labels) if label]),
        "reward_undesirable": _mean([r for r, label in zip(completion_rewards, labels) if not label]),
    }


def evaluate_preferences(run, data_path: str | Path, data_config, out_dir: Path, limit: Optional[int] = None,
                         base: bool = False, batch_size: int = 8, device: Optional[str] = None, access=None,
                         retention: bool = True, retention_limit: Optional[int] = None) -> dict:
    """Score a run on preference records and write `predictions.jsonl` and `metrics.json` into `out_dir`.

    Args:
        run: a UsableRun (loraft.run_access.open_run).
        data_config: the run's data section with the held-out file's record format (a preference_* or unpaired_*).
        base: also score the run's starting point (the reference), by log-probability.
        retention: also measure what the run kept of its base (the adapters off) on the project's general prompts,
            as for an SFT run (loraft.retention); retention_limit: the first N prompts only.
    Returns:
        the metrics written to metrics.json: {"run_dir", "data", "format", "records", "template", "objective",
        "beta", "reference", ..., "preference": {"adapter": {...}, "reference": {...} (with base)}}.
    """
    from loraft.preference import sides, tokenize_preferences
    from loraft.records import read_preferences_with_report

    config = run.config
    settings = data_config.model_copy(
        update={"path": str(data_path), "limit": limit, "eval_path": None, "eval_fraction": 0.0})
    # Read the data before loading the model, so a bad file fails in a second.
    preferences, _ = read_preferences_with_report(str(data_path), settings)
    objective, beta = config.train.objective, config.preference.beta
    measure = MEASURES[objective]
    needs_reference = measure == IMPLICIT_REWARD or base
    model, tokenizer, template, reference, info = load_preference_model(run, device, access,
                                                                        with_reference=needs_reference)
    dataset, token_report = tokenize_preferences(preferences, tokenizer, template, config.data.max_length,
                                                 config.preference, path=str(data_path))
    names = sides(preferences[0])
    sequences = [(prompt, completion) for side in names
                 for prompt, completion in zip(dataset["prompt_ids"], dataset[f"{side}_ids"])]

    def score(label: str) -> dict[str, list[tuple[float, int]]]:
        scored = completion_logprobs(model, sequences, tokenizer.pad_token_id, batch_size, progress=True, label=label)
        return {side: scored[i * len(dataset):(i + 1) * len(dataset)] for i, side in enumerate(names)}

    own = score("adapter")
    ref = None
    if needs_reference:
        with reference_active(model, reference):
            ref = score("reference")
    own_rewards = {side: rewards(measure, own[side], ref and ref[side], beta) for side in names}
    ref_rewards = {side: rewards(LOG_PROBABILITY, ref[side], None, beta) for side in names} if base else None

    def summary(model_measure: str, side_rewards: dict, logprobs: dict) -> dict:
        if "completion" in side_rewards:
            return unpaired_summary(model_measure, side_rewards["completion"], dataset["label"])
        return pair_summary(model_measure, side_rewards["chosen"], side_rewards["rejected"],
                            [lp for lp, _ in logprobs["chosen"]], [lp for lp, _ in logprobs["rejected"]])

    results = {"adapter": summary(measure, own_rewards, own)}
    if base:
        results["reference"] = summary(LOG_PROBABILITY, ref_rewards, ref)
    logging.getLogger("loraft").info("preference accuracy: %s", {k: v["accuracy"] for k, v in results.items()})
    metrics = {
        "run_dir": str(run.run_dir), "data": str(data_path), "format": settings.format, "records": len(preferences),
        "template": template.name, "objective": objective, "beta": None if objective == "sft" else beta,
        "reference": describe_reference(config),
        "truncated_prompts": token_report["truncated_prompts"],
        "truncated_completions": token_report["truncated_completions"],
        "metrics_note": "label_accuracy: share of completions whose implicit reward has the label's sign (> 0 for "
                        "true)" if "completion" in names else "accuracy: share of pairs whose reward (by measure) is "
                        "higher for chosen, a tie counting as no preference; margin: mean reward chosen - rejected",
        "preference": results,
    }
    if retention:
        from loraft.retention import retention_of_run

        metrics["retention"] = retention_of_run(model, tokenizer, template, info, batch_size, retention_limit)
    lines = []
    for index, preference in enumerate(preferences):
        row = {"source": preference["source"]}
        if "completion" in names:
            completion_reward = own_rewards["completion"][index]
            row.update(label=preference["label"], reward=completion_reward,
                       logprob=own["completion"][index][0],
                       agrees_with_label=(completion_reward > 0 if preference["label"] else completion_reward < 0)
                       if measure == IMPLICIT_REWARD else None)
            if base:
                row["reference_logprob"] = ref["completion"][index][0]
        else:
            chosen, rejected = own_rewards["chosen"][index], own_rewards["rejected"][index]
            row.update(reward_chosen=chosen, reward_rejected=rejected, prefers_chosen=chosen > rejected,
                       logprob_chosen=own["chosen"][index][0], logprob_rejected=own["rejected"][index][0])
            if base:
                ref_chosen, ref_rejected = ref["chosen"][index][0], ref["rejected"][index][0]
                row.update(reference_logprob_chosen=ref_chosen, reference_logprob_rejected=ref_rejected,
                           reference_prefers_chosen=ref_chosen > ref_rejected)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    out_dir.mkdir(exist_ok=True)
    write_text_atomically(out_dir / EVAL_PREDICTIONS, "".join(lines))
    write_text_atomically(out_dir / EVAL_METRICS, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics


PAIR_ROWS = [("preference accuracy", "accuracy", "{:.4f}"), ("mean margin", "margin", "{:.4f}"),
             ("reward chosen", "reward_chosen", "{:.4f}"), ("reward rejected", "reward_rejected", "{:.4f}"),
             ("logprob accuracy", "logprob_accuracy", "{:.4f}")]
UNPAIRED_ROWS = [("preference accuracy", "accuracy", "{:.4f}"), ("label accuracy", "label_accuracy", "{:.4f}"),
                 ("reward desirable", "reward_desirable", "{:.4f}"),
                 ("reward undesirable", "reward_undesirable", "{:.4f}")]


def format_preference_table(metrics: dict) -> str:
    """The preference metrics as a plain-text table: one row per number, reference and adapter side by side."""
    results = metrics["preference"]
    columns = [name for name in ("reference", "adapter") if name in results]
    beta = f", beta {metrics['beta']:g}" if metrics["beta"] is not None else ""
    unpaired = metrics["format"].startswith("unpaired_")
    what = "unpaired completions" if unpaired else "preference pairs"
    lines = [f"{metrics['records']} {what} from {metrics['data']} ({metrics['template']} template; "
             f"{metrics['objective']} run{beta}; reference: {metrics['reference']})",
             f"{'metric':20}" + "".join(f"{name:>22}" for name in columns),
             f"{'measure':20}" + "".join(f"{results[name]['measure']:>22}" for name in columns)]
    for label, key, fmt in UNPAIRED_ROWS if unpaired else PAIR_ROWS:
        cells = []
        for name in columns:
            value = results[name].get(key)
            text = fmt.format(value) if value is not None else results[name].get(f"{key}_note", "-")
            cells.append(f"{text:>22}")
        lines.append(f"{label:20}" + "".join(cells))
    return "\n".join(lines)
