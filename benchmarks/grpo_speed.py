"""GRPO step time and peak RSS: `loraft train` with train.objective=grpo against TRL's GRPOTrainer (issue 28).

    python benchmarks/grpo_speed.py                       # SmolLM2-135M-Instruct, 10 steps x 2 prompts x 8 answers
    python benchmarks/grpo_speed.py --steps 4 --quick     # a check that every variant runs (tiny lengths)
    python benchmarks/grpo_speed.py --generation          # one generate call four ways (weights, autocast, head)
    python benchmarks/grpo_speed.py --estimate 44         # the plan's rollout cost (loraft.rollout_cost) at 44-token
                                                          # prompts, four times (the benchmark's prompts average 44)

The model is the real one, SmolLM2-135M-Instruct (its Q4_1 GGUF, loraft.smollm2): loraft trains the .gguf file as a
user does (the `gguf-lora` preset's LoRA: r 16, alpha 32 on every linear layer of a block), TRL its dequantized
folder (loraft.gguf_base.hf_folder) loaded as its docs show (a path; TRL's own dtype default, float32). The prompts
are a narrow task with a checkable answer (an ISO date as day/month/year, a word in capitals in brackets), one
exact-match reward against the record's `answer`, the same for every variant, and the same sampling (temperature
1, top_p 1, --completion-tokens at most, --generations per prompt) and seed. Variants, each in its own process
(its peak RSS is its own):

  trl       GRPOTrainer(model=<folder>, reward_funcs=[exact match], args=GRPOConfig(...), train_dataset=<prompt,
            answer>, peft_config=LoraConfig(...)) with use_vllm=False and TRL's defaults (gradient checkpointing on,
            bf16 autocast where loraft's plan picks bf16, else fp32: TRL's bf16 default is emulated without bf16
            instructions), the benchmark's batch, steps, lr and sampling; the prompt is the chat template's text.
  trl-nogc  the same with gradient_checkpointing=False.
  loraft    loraft.train.train() with train.objective=grpo and loraft's defaults (the plan's precision: frozen
            weights stored in bf16 where it picks bf16, generation under its autocast; no checkpointing).
  loraft-fp32  the same with train.precision=fp32: fp32 weights, generation and update without autocast.
  loraft-accum2  (not in the default --variants) loraft with the step's completions updated in two micro-batches
            (per_device_train_batch_size halved, gradient_accumulation_steps=2; TRL's steps_per_generation follows, so
            one generate call of all of them still): less held for the backward, TRL's settings unchanged.
  loraft-head-each-token  loraft without loraft.weights.HeadCastOnce (not in the default --variants): generation's
            tied fp32 head cast by autocast at every token, as before it; the A/B of that speed-up.

Reported per variant: median seconds per optimizer step (the first, warm-up, left out), the generated completion
tokens per step and per second (sampling decides the lengths, so the cost per generated token is the fair
comparison), loraft's generation share (generation_seconds / step_time), peak RSS, and each step's mean reward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from sft_speed import draw_task, gguf_path  # noqa: E402

VARIANTS = ["trl", "trl-nogc", "loraft", "loraft-fp32"]
RESULTS = Path(__file__).resolve().parent / "results"


def make_prompts(count: int, seed: int) -> list[dict]:
    """Prompt records {"prompt": [user turn], "answer"} of sft_speed's narrow task, drawn from `seed`."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        question, answer = draw_task(rng)
        records.append({"prompt": [{"role": "user", "content": question}], "answer": answer})
    return records


def loraft_config(args, out_dir: Path, overrides=()):
    from loraft.config import load_config
    from loraft.presets import preset_path

    return load_config(preset_path("gguf-lora"), [
        f"model.name_or_path={args.gguf}", f"data.path={args.run_root}/prompts.jsonl", f"output_dir={out_dir}",
        "overwrite=true", "train.objective=grpo", f"train.max_steps={args.steps}", "train.logging_steps=1",
        "train.save_steps=100000", f"train.per_device_train_batch_size={args.prompts * args.generations}",
        "train.gradient_accumulation_steps=1", f"train.learning_rate={args.lr}", "train.warmup_steps=0",
        "train.lr_scheduler_type=constant", "adapter.dropout=0", "train.retention=off",
        f"grpo.num_generations={args.generations}", f"grpo.max_completion_length={args.completion_tokens}",
        "grpo.rewards=[{type: exact_match, field: answer}]", "grpo.completions_logged=0", *overrides])


class Clock:
    """Each optimizer step's end time and the logged metrics (a TrainerCallback made on first use)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self
        self.started, self.ends, self.logs, self.generation = None, [], [], []

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append(time.perf_counter() - clock.started)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.logs.append(dict(logs))

        self.callback = Callback()


def run_trl(args, variant: str, clock: Clock) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from loraft import gguf_base
    from loraft.model import build_peft_config
    from loraft.precision import resolve_precision
    from loraft.rewards import exact_match

    config = loraft_config(args, Path(args.run_root) / variant)
    precision = resolve_precision(config.train.precision)
    folder = gguf_base.hf_folder(str(args.gguf), weights="fp32")  # TRL's default dtype: float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records = [json.loads(line) for line in (Path(args.run_root) / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(records)

    def exact(completions, answer, **kwargs):
        return exact_match([c[0]["content"] if isinstance(c, list) else c for c in completions], answer)

    train = config.train
    arguments = GRPOConfig(
        output_dir=str(Path(args.run_root) / variant), max_steps=train.max_steps, logging_steps=1, save_strategy="no",
        report_to="none", per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=1, learning_rate=train.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, seed=train.seed, use_cpu=True, bf16=precision == "bf16", use_vllm=False,
        num_generations=args.generations, max_completion_length=args.completion_tokens, temperature=1.0, top_p=1.0,
        gradient_checkpointing=variant == "trl",
        model_init_kwargs={"variant": "fp32", "dtype": "float32"})  # the folder's fp32 weights file
    set_seed(train.seed)
    trainer = GRPOTrainer(model=str(folder), reward_funcs=[exact], args=arguments, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=build_peft_config(config.adapter),
                          callbacks=[clock.callback])
    generate = trainer.model.generate

    def timed(*args, **kwargs):  # the generation time loraft logs as generation_seconds, measured the same way
        started = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            clock.generation.append(time.perf_counter() - started)

    trainer.model.generate = timed
    trainer.train()
    return {"precision": precision, "weights_dtype": "float32", "gradient_checkpointing": arguments.gradient_checkpointing}


def run_loraft(args, variant: str, clock: Clock) -> dict:
    from loraft.train import train

    overrides = ["train.precision=fp32"] if variant == "loraft-fp32" else []
    if variant == "loraft-accum2":  # the step's completions in two update micro-batches: less held for the backward
        overrides = [f"train.per_device_train_batch_size={args.prompts * args.generations // 2}",
                     "train.gradient_accumulation_steps=2"]
    if variant == "loraft-head-each-token":  # the A/B of HeadCastOnce: autocast casts the tied head at every token
        import contextlib

        from loraft.objectives import grpo

        grpo.HeadCastOnce = lambda model: contextlib.nullcontext()
    run_dir = train(loraft_config(args, Path(args.run_root) / variant, overrides), callbacks=[clock.callback],
                    progress_bar=False)
    plan = json.loads((run_dir / "loraft_run.json").read_text())["plan"]
    return {key: plan.get(key) for key in ("precision", "weights", "gradient_checkpointing", "rollout")}


def worker(args) -> None:
    clock = Clock()
    setup = (run_loraft if args.worker.startswith("loraft") else run_trl)(args, args.worker, clock)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    common.write_json(Path(args.run_root) / f"{args.worker}.json",
                      {"variant": args.worker, "setup": setup, "ends": clock.ends, "logs": clock.logs,
                       "peak_rss_gib": peak, "load_average": common.load_average()})


def summarize(result: dict) -> dict:
    ends, logs = result["ends"], result["logs"]
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    lengths = [log.get("completions/mean_length", 0) for log in logs]
    generation = ([g / log["step_time"] for g, log in zip(result["generation"], logs) if log.get("step_time")]
                  if result.get("generation") else
                  [log["generation_seconds"] / log["step_time"] for log in logs
                   if log.get("generation_seconds") and log.get("step_time")])
    return {"setup": result["setup"], "median_step_s": statistics.median(step_s), "step_s": step_s,
            "mean_completion_length": statistics.mean(lengths[1:] or lengths),
            "generation_share": statistics.median(generation) if generation else None,
            "rewards": [log.get("reward") for log in logs], "peak_rss_gib": result["peak_rss_gib"],
            "load_average": result["load_average"]}


def generation_costs(repeats: int = 3) -> list[dict]:
    """Median seconds of one sampled generate call of 16 rows x 32 new tokens (40-token prompts) on SmolLM2 with the
    benchmark's LoRA, four ways: TRL's (fp32 weights, no autocast), fp32 weights under bf16 autocast, and loraft's
    under a bf16 plan (frozen weights stored in bf16, bf16 autocast) with the tied fp32 head cast at every token (as
    autocast does) and once a call (loraft.weights.HeadCastOnce)."""
    import contextlib

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loraft import gguf_base
    from loraft.config import AdapterConfig
    from loraft.model import build_peft_config
    from loraft.presets import preset_path
    from loraft.config import load_config
    from loraft.weights import cast_frozen_weights

    folder = gguf_base.hf_folder(str(gguf_path()), weights="fp32")
    adapter: AdapterConfig = load_config(preset_path("gguf-lora"), ["adapter.dropout=0"]).adapter
    ids = torch.randint(100, 20000, (16, 40))
    rows = []
    from loraft.weights import HeadCastOnce

    for name, cast, autocast, head_once in (
            ("fp32 weights, no autocast (TRL)", False, False, False),
            ("fp32 weights, bf16 autocast", False, True, False),
            ("bf16 frozen weights, bf16 autocast, the tied head cast at every token", True, True, False),
            ("bf16 frozen weights, bf16 autocast, the tied head cast once a call (loraft, bf16 plan)", True, True,
             True)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder, variant="fp32", dtype=torch.float32)
        model = get_peft_model(model, build_peft_config(adapter))
        if cast:
            cast_frozen_weights(model, torch.bfloat16)

        def once():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                started = time.perf_counter()  # HeadCastOnce's one cast counts
                with HeadCastOnce(model) if head_once else contextlib.nullcontext():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                   min_new_tokens=32, do_sample=True, pad_token_id=0)
                    return time.perf_counter() - started

        once()
        rows.append({"way": name, "median_s": round(statistics.median(once() for _ in range(repeats)), 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rollout_estimates(args, repeats: int = 4) -> None:
    """loraft.rollout_cost's estimate for the loraft variant's step (bf16 where the plan picks it), measured afresh
    `repeats` times: its spread against the benchmark's measured generation_seconds and step_time."""
    import tempfile

    from loraft import rollout_cost
    from loraft.plan import plan_run, read_model_config

    args.gguf, args.run_root = str(gguf_path()), tempfile.mkdtemp(prefix="grpo-estimate-")
    config = loraft_config(args, Path(args.run_root) / "run")
    model_config = read_model_config(config)[0]
    precision = plan_run(config, model_config, measure=False).precision
    for _ in range(repeats):
        result = rollout_cost.measure(config, precision, model_config, args.estimate, log=lambda line: None)
        print(json.dumps({key: result[key] for key in ("seconds", "generation_s", "update_s", "parts")}), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion-tokens", type=int, default=32, help="most tokens per completion")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8-token completions, 4 per prompt")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, in rotated order; report each variant's median round")
    parser.add_argument("--json", help="the report (default: benchmarks/results/DATE-CLASS-grpo_speed.json)")
    parser.add_argument("--generation", action="store_true", help="only the generate call, four ways")
    parser.add_argument("--estimate", type=int, metavar="PROMPT_TOKENS",
                        help="only the plan's rollout cost for the benchmark's loraft run, measured four times")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run-root", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.completion_tokens, args.generations = 8, 4
    if args.worker:
        worker(args)
        return 0
    if args.generation:
        generation_costs()
        return 0
    if args.estimate:
        rollout_estimates(args)
        return 0

    import tempfile

    args.gguf = str(gguf_path())
    root = Path(tempfile.mkdtemp(prefix="grpo-speed-"))
    records = make_prompts(args.steps * args.prompts, args.seed)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    results, variants = {}, args.variants.split(",")
    rounds: dict[str, list[dict]] = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        order = variants[round_index % len(variants):] + variants[:round_index % len(variants)]  # rotated
        for variant in order:
            print(f"[bench] round {round_index + 1}/{args.rounds}: {variant} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--worker", variant, "--run-root", str(root), "--gguf", args.gguf,
                       "--steps", str(args.steps), "--prompts", str(args.prompts), "--generations",
                       str(args.generations), "--completion-tokens", str(args.completion_tokens), "--lr", str(args.lr)]
            subprocess.run(command, check=True)
            rounds[variant].append(summarize(json.loads((root / f"{variant}.json").read_text())))
    for variant, runs in rounds.items():
        # the round whose median step is the median of the rounds' (one round: that round)
        middle = sorted(runs, key=lambda run: run["median_step_s"])[(len(runs) - 1) // 2]
        results[variant] = {**middle, "rounds_median_step_s": [run["median_step_s"] for run in runs],
                            "rounds_peak_rss_gib": [run["peak_rss_gib"] for run in runs]}
    for name, runs in rounds.items():  # each round's own ratio: the same round ran both, minutes apart
        for reference in ("trl", "trl-nogc"):
            if name != reference and rounds.get(reference):
                results[name][f"rounds_{reference}_over_this"] = [
                    ref["median_step_s"] / run["median_step_s"] for ref, run in zip(rounds[reference], runs)]
    for name, s in results.items():
        base = results.get("trl")
        if base and name != "trl":
            s["vs_trl"] = {"step": base["median_step_s"] / s["median_step_s"],
                           "per_token": (base["median_step_s"] / base["mean_completion_length"])
                           / (s["median_step_s"] / s["mean_completion_length"]),
                           "rss": s["peak_rss_gib"] / base["peak_rss_gib"]}
    machine = common.machine()
    report = {"benchmark": "grpo_speed", "date": datetime.date.today().isoformat(), "machine": machine,
              "steps": args.steps, "prompts": args.prompts, "generations": args.generations,
              "completion_tokens": args.completion_tokens, "rounds": args.rounds, "results": results}
    out = Path(args.json) if args.json else RESULTS / (f"{report['date']}-{machine['hardware_class']}-grpo_speed"
                                                      + ("-quick" if args.quick else "") + ".json")
    common.write_json(out, report)
    print("| variant | precision | grad ckpt | s/step (median) | completion tokens (mean) | generation share "
          "| peak RSS GiB | vs trl: step | per token | RSS |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        c = s.get("vs_trl", {})
        share = f"{s['generation_share']:.0%}" if s["generation_share"] is not None else ""
        print(f"| {name} | {s['setup'].get('precision')} | {'yes' if s['setup'].get('gradient_checkpointing') else 'no'}"
              f" | {s['median_step_s']:.2f} | {s['mean_completion_length']:.1f} | {share} | {s['peak_rss_gib']:.2f}"
              + (f" | {c['step']:.2f}x | {c['per_token']:.2f}x | {c['rss']:.2f} |" if c else " | | | |"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
