"""DPO step throughput and peak RSS: `loraft train` with train.objective=dpo against TRL's DPOTrainer (issue 17).

    python benchmarks/dpo_speed.py --quick                            # bloom-small, 16 pairs, 3-5 min on 2 cores
    python benchmarks/dpo_speed.py                                    # bloom-1b4-zh, 16 pairs, ~40 min on 2 cores
    python benchmarks/dpo_speed.py --variants trl-bf16,loraft          # TRL's literal bf16 default (see below)

Every variant trains a fresh adapter on the same random-weight model (common.ensure_model_dir) over the same
generated preference pairs in the same order (random sampler, seed 42 in both), each in its own process so its
peak RSS is its own, with the recipe's LoRA (target `.*\\.1.*query_key_value`, word_embeddings trained in full),
batch 1 x grad-accum 8 and lr 5e-5, from scratch: the reference is the base with the adapter switched off. Variants:

  trl        TRL's DPOTrainer as its documentation shows it: DPOTrainer(model=<path>, args=DPOConfig(...),
             train_dataset=<text: prompt/chosen/rejected>, processing_class=tokenizer, peft_config=LoraConfig(...)),
             TRL's defaults (gradient checkpointing on, beta 0.1, sigmoid loss, max_length 1024, its fused lm_head)
             except: the recipe's 1 epoch (Trainer's default is 3), batch, accumulation and lr; use_cpu without a
             GPU; logging every step, no checkpoint saves, no reporting; and the precision loraft's plan picks on
             this machine: TRL's bf16=True default is emulated on CPUs without bf16 instructions (about 300x slower
             matmuls on an AVX2-only EPYC), so it would measure the emulation, not TRL.
  trl-nogc   the same with gradient_checkpointing=False: the checkpointing cost apart from loraft's attention path.
  trl-bf16   TRL's literal default (bf16=True); run only when named in --variants.
  loraft     loraft.train.train() with train.objective=dpo on the recipe config (configs/bloom-1b4-zh-lora.yaml
             with the shape's targets), loraft's defaults otherwise: what `loraft train` runs after its data stage.

Both see the same token ids: the pairs are text over the benchmark tokenizer's words (t4..t63 and </s>; the
compute does not depend on which ids), TRL tokenizes the text itself, loraft gets the ids pre-tokenized
(`train(prepared=...)`, as loraft.preference hands TRL's trainer its columns), and each trl variant checks that its
tokenized train_dataset equals those ids before it trains. Lengths are the SFT benchmark's alpaca-zh-like mix
(common.draw_prompt_length / draw_response_length): prompt 10-150, each completion 5-250 tokens ending in EOS,
prompt + completion <= 256 (the recipe's max_length), so neither trainer truncates.

Reported per variant: median seconds per optimizer step (the first, warm-up, left out), pairs/s and tokens/s
(non-padding tokens of both sequences, steps after the first), peak RSS, the first step's loss (ln 2 = 0.6931: the
policy equals the reference, a check that all compute the same loss), every step's loss and its largest difference
from trl's, whether each step held the same pairs (a checksum of its token ids), the GEMM peaks before and after and
the load average (whether the machine was shared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ["trl", "trl-nogc", "trl-bf16", "loraft"]
DEFAULT_VARIANTS = ["trl", "trl-nogc", "loraft"]
STEP_PAIRS = 8  # the recipe's per-device batch 1 x grad-accum 8
WORDS = (4, 64)  # the benchmark tokenizer's word tokens t4..t63 (common.build_tokenizer)
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
PAIR_COUNTS = ("pairs", "tokens", "completion_tokens", "padded", "checksum")
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------- the data


def make_pairs(count: int, seed: int = 0, max_length: int = 256) -> list[dict]:
    """Preference pairs as token ids: a prompt and two completions (chosen, rejected), each ending in EOS and
    within max_length together with the prompt."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        prompt_length = common.draw_prompt_length(rng)
        room = max_length - prompt_length
        pair = {"prompt_ids": rng.integers(*WORDS, prompt_length).tolist()}
        for side in ("chosen", "rejected"):
            length = min(common.draw_response_length(rng), room)
            pair[f"{side}_ids"] = rng.integers(*WORDS, length - 1).tolist() + [common.EOS_ID]
        pairs.append(pair)
    return pairs


def as_text(pairs: list[dict], tokenizer) -> list[dict]:
    """The pairs as TRL's standard (non-conversational) text format: prompt, and each completion with a leading
    space, so that the word-level tokenizer reads prompt + completion as the two id lists joined."""

    def text(ids):
        return " ".join(tokenizer.convert_ids_to_tokens(ids))

    return [{"prompt": text(pair["prompt_ids"]), "chosen": " " + text(pair["chosen_ids"]),
             "rejected": " " + text(pair["rejected_ids"])} for pair in pairs]


def describe_pairs(pairs: list[dict]) -> dict:
    prompt = np.array([len(p["prompt_ids"]) for p in pairs])
    chosen = np.array([len(p["chosen_ids"]) for p in pairs])
    rejected = np.array([len(p["rejected_ids"]) for p in pairs])
    return {
        "pairs": len(pairs), "prompt_mean": float(prompt.mean()), "chosen_mean": float(chosen.mean()),
        "rejected_mean": float(rejected.mean()),
        "longest": int((prompt + np.maximum(chosen, rejected)).max()),
        # what one micro-batch computes: chosen and rejected, each padded to the longer of the two
        "padded_tokens_mean": float((2 * (prompt + np.maximum(chosen, rejected))).mean()),
    }


# ----------------------------------------------------------------------------------------------- worker side


def count_pairs(batch) -> dict:
    """What a collated DPO batch holds (TRL's DataCollatorForPreference: chosen rows, then rejected rows)."""
    import torch

    input_ids = batch["input_ids"]
    positions = torch.arange(1, input_ids.shape[1] + 1)
    return {
        "pairs": input_ids.shape[0] // 2, "tokens": int(batch["attention_mask"].sum()),
        "completion_tokens": int(batch["completion_mask"].sum()), "padded": input_ids.numel(),
        # which pairs the step trained on: the same sum in two variants means the same pairs in the same rows
        "checksum": int((input_ids * positions).sum()),
    }


def trl_arguments(variant: str, out_dir: Path):
    """DPOConfig as TRL documents it, with only the changes the module docstring lists."""
    import torch
    from trl import DPOConfig

    from loraft.precision import resolve_precision

    precision = "bf16" if variant == "trl-bf16" else resolve_precision("auto")  # the precision loraft's plan picks
    return DPOConfig(
        output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=1,
        gradient_accumulation_steps=STEP_PAIRS, learning_rate=5e-5, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=not torch.cuda.is_available(), bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=variant != "trl-nogc",
    )


def run_trl(variant: str, model_dir: Path, data, out_dir: Path, shape, callbacks) -> dict:
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = trl_arguments(variant, out_dir)
    text = data.select_columns(["prompt", "chosen", "rejected"])
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=text, processing_class=tokenizer,
                         peft_config=common.peft_config(shape), callbacks=callbacks)
    for column in ID_COLUMNS:  # TRL's tokenization of the text is loraft's input, id for id
        if trainer.train_dataset[column] != data[column]:
            raise SystemExit(f"{variant}: TRL tokenized the pairs' text into other {column} than loraft trains on")
    trainer.train()
    return {"precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "gradient_checkpointing": args.gradient_checkpointing,
            "attention": trainer.model.config._attn_implementation,
            "optimizer": getattr(args.optim, "value", args.optim),
            "token_ids_equal_loraft": True}


def run_loraft(model_dir: Path, data, out_dir: Path, shape, callbacks) -> dict:
    from loraft.train import train

    config = common.recipe_config(shape, model_dir, out_dir, ["train.objective=dpo"])
    prepared = SimpleNamespace(train=data.select_columns(list(ID_COLUMNS)), eval=None,
                               report={"source": "benchmark token ids"})
    run_dir = train(config, callbacks=callbacks, prepared=prepared)
    plan = json.loads((run_dir / "loraft_run.json").read_text())["plan"]
    setup = {key: plan.get(key) for key in ("precision", "gradient_checkpointing", "attention_patch", "speed_path",
                                            "optimizer", "sampler")}
    return {**setup, "attention": "sdpa-alibi (loraft patch)" if plan.get("attention_patch") else plan.get("attention")}


def worker(args) -> None:
    from datasets import load_from_disk

    shape = common.SHAPES[args.shape]
    data = load_from_disk(args.data)
    clock = common.StepClock(count=count_pairs, keys=PAIR_COUNTS)
    out_dir = Path(args.out).with_suffix("")
    setup = {}

    def run():
        runner = run_loraft if args.worker == "loraft" else lambda *a: run_trl(args.worker, *a)
        setup.update(runner(Path(args.model_dir), data, out_dir, shape, [clock.callback]))

    from loraft.precision import resolve_precision

    # the GEMM peaks in the precisions the runs compute in (an emulated bf16 reading alone takes about a minute)
    bf16 = args.worker == "trl-bf16" or resolve_precision("auto") == "bf16"
    measured = common.measured_run(run, dtypes=("fp32", "bf16") if bf16 else ("fp32",))
    common.write_json(Path(args.out), {"variant": args.worker, "setup": setup, "steps": clock.steps,
                                       "losses": clock.losses, **measured})


# ----------------------------------------------------------------------------------------------- parent side


def summarize(result: dict) -> dict:
    steps = result["steps"]
    timed = steps[1:] if len(steps) > 1 else steps
    elapsed = timed[-1]["time"] - (steps[0]["time"] if len(steps) > 1 else 0.0)
    step_seconds = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])] or [steps[0]["time"]]
    losses = [x["loss"] for x in result["losses"]]
    return {
        "variant": result["variant"], "setup": result["setup"],
        "median_step_s": statistics.median(step_seconds), "step_s": step_seconds,
        "first_step_s": steps[0]["time"], "timed_steps": len(timed),
        "pairs_s": sum(s["pairs"] for s in timed) / elapsed,
        "tokens_s": sum(s["tokens"] for s in timed) / elapsed,
        "padding_share": 1 - sum(s["tokens"] for s in timed) / max(sum(s["padded"] for s in timed), 1),
        "peak_rss_gib": result["peak_rss_gib"], "peak_gpu_gib": result["peak_gpu_gib"],
        "wall_s": result["wall_s"],
        "first_loss": losses[0] if losses else float("nan"),
        "first_loss_is_ln2": bool(losses) and abs(losses[0] - math.log(2)) < 1e-4,
        "losses": losses,
        "step_checksums": [s["checksum"] for s in steps],
        "load_average": result["load_average"],
        "gemm_fp32_gflops": result["gemm_fp32_gflops"], "gemm_bf16_gflops": result.get("gemm_bf16_gflops"),
        "steps": len(steps),
    }


def add_comparisons(summaries: dict) -> None:
    """Each variant against trl and trl-nogc (speed: pairs/s ratio; memory: peak RSS ratio), in place."""
    for baseline in ("trl", "trl-nogc", "trl-bf16"):
        if baseline not in summaries:
            continue
        base = summaries[baseline]
        for s in summaries.values():
            s[f"speed_vs_{baseline}"] = s["pairs_s"] / base["pairs_s"]
            s[f"rss_vs_{baseline}"] = s["peak_rss_gib"] / base["peak_rss_gib"]
            s[f"max_loss_diff_vs_{baseline}"] = max(
                (abs(a - b) for a, b in zip(s["losses"], base["losses"])), default=float("nan"))
            s[f"same_pairs_as_{baseline}"] = s["step_checksums"] == base["step_checksums"]


def format_table(report: dict) -> str:
    machine, data = report["machine"], report["data"]
    lines = [
        f"\n{report['shape']} ({report['shape_note']}); {machine.get('cpu')}, {report['threads']} threads per run, "
        f"GPU {machine.get('gpu') or 'none'}; loraft's plan precision here: {machine.get('auto_precision')} "
        f"(hardware class {machine.get('hardware_class')})",
        f"{data['pairs']} pairs, {STEP_PAIRS} per optimizer step; prompt {data['prompt_mean']:.0f}, chosen "
        f"{data['chosen_mean']:.0f}, rejected {data['rejected_mean']:.0f} tokens on average; "
        f"{data['padded_tokens_mean']:.0f} padded tokens per pair (chosen + rejected)",
        "| variant | precision | grad ckpt | attention | s/step (median, excl. 1st) | pairs/s | tokens/s "
        "| vs trl | vs trl-nogc | peak RSS GiB | RSS vs trl | first loss | max \\|Δloss\\| vs trl | same pairs "
        "| GEMM GFLOPS before/after | load avg before/after |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    nan = float("nan")
    for name, s in report["results"].items():
        setup = s["setup"]
        attention = setup.get("attention") or "transformers' default"
        gemm = f"fp32 {s['gemm_fp32_gflops'][0]:.0f} / {s['gemm_fp32_gflops'][1]:.0f}"
        if s.get("gemm_bf16_gflops"):
            gemm += f"; bf16 {s['gemm_bf16_gflops'][0]:.0f} / {s['gemm_bf16_gflops'][1]:.0f}"
        step = f"{s['median_step_s']:.2f}" + (" (one step: warm-up included)" if s.get("steps") == 1 else "")
        lines.append(
            f"| {name} | {setup.get('precision')} | {'yes' if setup.get('gradient_checkpointing') else 'no'} "
            f"| {attention} | {step} | {s['pairs_s']:.3f} | {s['tokens_s']:.1f} "
            f"| {s.get('speed_vs_trl', nan):.2f}x | {s.get('speed_vs_trl-nogc', nan):.2f}x "
            f"| {s['peak_rss_gib']:.2f} | {s.get('rss_vs_trl', nan):.2f} "
            f"| {s['first_loss']:.4f}{'' if s['first_loss_is_ln2'] else ' (not ln 2!)'} "
            f"| {s.get('max_loss_diff_vs_trl', nan):.1e} | {'yes' if s.get('same_pairs_as_trl', True) else 'NO'} "
            f"| {gemm} | {s['load_average'][0]:.1f} / {s['load_average'][1]:.1f} |"
        )
    lines.append("\nloss per optimizer step (the first must be ln 2 = 0.6931):")
    for name, s in report["results"].items():
        lines.append(f"  {name:9} " + " ".join(f"{x:.6f}" for x in s["losses"]))
    if "loraft" in report["results"]:
        s = report["results"]["loraft"]
        for baseline in ("trl", "trl-nogc"):
            if f"speed_vs_{baseline}" in s:
                lines.append(f"loraft / {baseline}: {s[f'speed_vs_{baseline}']:.2f}x pairs/s, "
                             f"{s[f'rss_vs_{baseline}']:.2f}x peak RSS, largest step-loss difference "
                             f"{s[f'max_loss_diff_vs_{baseline}']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bloom-small, 16 pairs (3-5 minutes on 2 cores)")
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="bloom-1b4-zh")
    parser.add_argument("--pairs", type=int, default=16,
                        help=f"preference pairs ({STEP_PAIRS} per optimizer step; the first step is warm-up, so 16 is "
                        "the fewest that time one; about 40 minutes at bloom-1b4-zh on a 2-core AVX2-only CPU)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    parser.add_argument("--json", help="write the report here "
                        "(default: benchmarks/results/DATE-HARDWARE_CLASS-dpo_speed-SHAPE.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.pairs = "bloom-small", 16
    if args.worker:
        worker(args)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = common.SHAPES[args.shape]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if args.pairs < STEP_PAIRS:
        parser.error(f"--pairs must be at least {STEP_PAIRS} (one optimizer step)")
    now = datetime.datetime.now()
    run_root = common.CACHE / "runs" / f"dpo-{shape.name}-{now:%Y%m%d-%H%M%S}"
    run_root.mkdir(parents=True, exist_ok=True)

    print(f"[bench] building/loading {shape.name} ({shape.note})", flush=True)
    model_dir = common.ensure_model_dir(shape)
    pairs = make_pairs(args.pairs, seed=0)
    from datasets import Dataset

    tokenizer = common.build_tokenizer()
    rows = [{**text, **ids} for text, ids in zip(as_text(pairs, tokenizer), pairs)]
    Dataset.from_list(rows).save_to_disk(str(run_root / "data"))
    data_stats = describe_pairs(pairs)
    print(f"[bench] data {data_stats}", flush=True)

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    summaries = {}
    for variant in variants:
        out = run_root / f"{variant}.json"
        print(f"[bench] {variant} ...", flush=True)
        command = [sys.executable, __file__, "--worker", variant, "--shape", shape.name,
                   "--model-dir", str(model_dir), "--data", str(run_root / "data"), "--out", str(out)]
        log = run_root / f"{variant}.log"
        with log.open("w") as handle:
            code = subprocess.call(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if code != 0:
            print(f"[bench] {variant} failed (exit {code}); see {log}", flush=True)
            continue
        summaries[variant] = s = summarize(json.loads(out.read_text()))
        print(f"[bench] {variant}: {s['median_step_s']:.2f} s/step, {s['pairs_s']:.3f} pairs/s, "
              f"peak RSS {s['peak_rss_gib']:.2f} GiB, first loss {s['first_loss']:.4f}, {s['wall_s']:.0f} s to load "
              f"and train", flush=True)

    add_comparisons(summaries)
    machine = common.machine()
    report = {
        "command": common.command_line(__file__), "date": now.isoformat(timespec="seconds"),
        "machine": machine, "threads": args.threads or machine["threads"],
        "shape": shape.name, "shape_note": shape.note,
        "trl_precision_note": "trl and trl-nogc run in loraft's plan precision for this machine; trl-bf16 is TRL's "
                              "literal default (bf16=True)",
        "data": data_stats, "results": summaries,
    }
    print(format_table(report))
    stem = f"{now:%Y-%m-%d}-{machine['hardware_class']}-dpo_speed-{shape.name}"
    path = Path(args.json) if args.json else RESULTS / f"{stem}.json"
    common.write_json(path, report)
    common.write_json(run_root / "summary.json", report)
    print(f"[bench] report: {path}; raw results: {run_root}")
    failed = [v for v in variants if v not in summaries]
    return 1 if failed or not all(s["first_loss_is_ln2"] for s in summaries.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
