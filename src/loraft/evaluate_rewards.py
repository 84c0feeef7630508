"""`loraft eval RUN --data prompts.jsonl` for a GRPO run: each reward's mean and pass@1 on held-out prompts.

Every prompt record (loraft.prompts) is answered once, greedily, by the run (and with `base`, by the base: the
adapter switched off), and every reward of the run's grpo.rewards scores the answer as in training (the same
guarded functions, the record's fields passed by name). pass@1 is the share of prompts whose single answer passes:
a built-in check at 1 (exact_match, number, regex), no length penalty (length), a user function's reward above 0;
`all` passes every reward at once. Results go to RUN_DIR/eval/metrics.json and predictions.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


def passes(reward_type: str, value: Optional[float]) -> Optional[bool]:
    """Whether one reward value passes (None: the reward does not apply to the record)."""
    if value is None:
        return None
    if reward_type == "length":
        return value >= 0
    if reward_type == "function":
        return value > 0
    return value >= 1


def score(rewards_config, functions, prompts: Sequence[str], completions: Sequence[str],
          completion_ids: Sequence[Sequence[int]], columns: dict) -> tuple[dict, list[dict]]:
    """(summary per reward and `all`, per-record rewards) of one model's answers."""
    per_reward = {reward.label: function(prompts=list(prompts), completions=list(completions),
                                         completion_ids=list(completion_ids), **columns)
                  for reward, function in zip(rewards_config, functions)}
    summary, rows = {}, []
    for index in range(len(completions)):
        rows.append({label: values[index] for label, values in per_reward.items()})
    every = [True] * len(completions)
    for reward in rewards_config:
        values = per_reward[reward.label]
        applied = [v for v in values if v is not None]
        verdicts = [passes(reward.type, v) for v in values]
        every = [a and (v is not False) for a, v in zip(every, verdicts)]
        summary[reward.label] = {
            "mean": sum(applied) / len(applied) if applied else None,
            "pass@1": 100.0 * sum(v is True for v in verdicts) / max(sum(v is not None for v in verdicts), 1),
            "scored": len(applied)}
    summary["all"] = {"pass@1": 100.0 * sum(every) / max(len(every), 1)}
    return summary, rows


def evaluate_rewards(run, run_dir: Path, data_path, limit: Optional[int] = None, base: bool = False,
                     batch_size: int = 8, max_new_tokens: Optional[int] = None, device: Optional[str] = None,
                     retention: bool = True, retention_limit: Optional[int] = None) -> dict:
    """Score a GRPO run (a UsableRun) on prompt records; writes eval/metrics.json and eval/predictions.jsonl.
    With `retention`, also what the run kept of its base on the general prompts (loraft.retention), as for SFT."""
    from loraft.generate import cli_flag, generate_answers, load_run, resolve_generation
    from loraft.prompts import check_reward_fields, read_prompts
    from loraft.rewards import RECORD_COLUMN, build_rewards
    from loraft.rundir import RunDir

    config = run.config
    records = read_prompts(str(data_path), config.data)[0][:limit]
    check_reward_fields(str(data_path), config, records)
    functions, _ = build_rewards(config.grpo.rewards)
    model, tokenizer, template, info = load_run(run, device=device)
    settings = resolve_generation(config.generation, {
        "temperature": 0.0, "max_new_tokens": max_new_tokens or config.grpo.max_completion_length}, label=cli_flag)
    names = sorted({name for record in records for name in record["fields"]})
    columns = {name: [record["fields"].get(name) for record in records] for name in names}
    columns[RECORD_COLUMN] = [record["source"] for record in records]
    prompts_text = [template.render_text(r["prompt"], tokenizer.eos_token, add_generation_prompt=True)
                    for r in records]

    def answer_and_score():
        answers = generate_answers(model, tokenizer, template, [r["prompt"] for r in records], settings,
                                   batch_size=batch_size, progress=True)
        texts = [a.text for a in answers]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        summary, rows = score(config.grpo.rewards, functions, prompts_text, texts, ids, columns)
        return summary, rows, texts

    adapter, adapter_rows, adapter_texts = answer_and_score()
    metrics = {"run_dir": str(run_dir), "data": str(data_path), "records": len(records), "template": template.name,
               "objective": "grpo", "generation": {"decoding": "greedy", "max_new_tokens": settings.max_new_tokens},
               "rewards": {"adapter": adapter}}
    base_rows = base_texts = None
    if base:
        with model.disable_adapter():
            metrics["rewards"]["base"], base_rows, base_texts = answer_and_score()
    if retention:
        from loraft.retention import retention_of_run

        metrics["retention"] = retention_of_run(model, tokenizer, template, info, batch_size, retention_limit)
    rows = []
    for index, record in enumerate(records):
        row = {"source": record["source"], "prompt": prompts_text[index], "fields": record["fields"],
               "prediction": adapter_texts[index], "rewards": adapter_rows[index]}
        if base_rows is not None:
            row.update(base_prediction=base_texts[index], base_rewards=base_rows[index])
        rows.append(row)
    return RunDir(run_dir).write_eval(rows, metrics)



def format_rewards_table(metrics: dict) -> str:
    """Each reward's mean and pass@1, base and run side by side."""
    columns = [name for name in ("base", "adapter") if name in metrics["rewards"]]
    lines = [f"{metrics['records']} prompts from {metrics['data']} ({metrics['template']} template, greedy, one "
             "answer each)", f"{'reward':24}" + "".join(f"{name + ' mean':>14}{name + ' pass@1%':>16}"
                                                        for name in columns)]
    labels = [label for label in metrics["rewards"][columns[-1]] if label != "all"]
    for label in labels + ["all"]:
        cells = ""
        for column in columns:
            entry = metrics["rewards"][column][label]
            mean = entry.get("mean")
            cells += f"{'-' if mean is None else format(mean, '.3f'):>14}{entry['pass@1']:>16.1f}"
        lines.append(f"{label:24}" + cells)
    return "\n".join(lines)
