"""Training speed: the reference recipe vs TRL's SFTTrainer vs `loraft train`, side by side.

    python benchmarks/train_speed.py --quick                       # small BLOOM, < 2 minutes
    python benchmarks/train_speed.py --shape bloom-1b4-zh --samples 160
    python benchmarks/train_speed.py --shape llama-large-vocab --samples 64

Every variant trains the same random-weight model (saved once, loaded with from_pretrained like a user
would) on the same token-id samples, in the same sampler order (seed 42), each in its own process so its
peak RSS is its own. Variants:

  reference      the recipe as written: peft LoRA (regex + modules_to_save), Trainer, batch 1, grad-accum 8,
                 fp32, DataCollatorForSeq2Seq(padding=True). Adapted: `tokenizer=` -> `processing_class=`
                 (renamed in transformers 5); logging every step and no checkpoints (save_steps=1 would write
                 ~1.1 GB per step), for every variant alike.
  trl            TRL SFTTrainer, completion-only loss (prompt/completion mask), the same LoraConfig, the same
                 batch/accumulation/lr/seed; TRL's own defaults otherwise (bf16 autocast, gradient checkpointing).
  loraft         loraft.train.train() with the reference config and loraft's defaults (what `loraft train`
                 runs after its data stage, which benchmarks/tokenize_speed.py measures).
  loraft-ordered loraft with train.sampling=random: the reference's sample order, the same 8 samples in
                 each optimizer step (batch reordering off).
  loraft-fp32    loraft-ordered with train.precision=fp32 (the parity mode).

Throughput excludes the first optimizer step (warm-up); the loss of every optimizer step is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ["reference", "trl", "loraft", "loraft-ordered", "loraft-fp32"]
STEP_SAMPLES = 8  # the reference's per-device batch 1 x grad-accum 8


# ----------------------------------------------------------------------------------------------- worker side


def _dataset(path: Path, variant: str):
    from datasets import load_from_disk

    data = load_from_disk(str(path))
    if variant == "trl":
        # TRL's completion-only loss takes a completion_mask and builds the labels itself
        return data.map(lambda s: {"completion_mask": [int(x != -100) for x in s["labels"]]},
                        remove_columns=["labels", "attention_mask", "length"])
    if variant == "reference":
        return data.remove_columns(["length"])
    return data


def run_reference(model_dir, data, out_dir, shape, callbacks):
    from peft import get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # low_cpu_mem_usage is the default in transformers 5
    model = get_peft_model(model, common.peft_config(shape))
    args = TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=1, gradient_accumulation_steps=8,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, processing_class=tokenizer, train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True), callbacks=callbacks)
    trainer.train()


def run_trl(model_dir, data, out_dir, shape, callbacks):
    from transformers import AutoTokenizer

    trainer = common.sft_trainer(model_dir, data, AutoTokenizer.from_pretrained(model_dir), common.peft_config(shape),
                                 callbacks, out_dir, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                 learning_rate=5e-5, completion_only_loss=True, max_length=256)
    trainer.train()


def run_loraft(model_dir, data, out_dir, shape, callbacks, overrides=()):
    from types import SimpleNamespace

    from loraft.train import train

    config = common.recipe_config(shape, model_dir, out_dir, overrides)
    prepared = SimpleNamespace(train=data, eval=None, report={"source": "benchmark token ids"})
    train(config, callbacks=callbacks, prepared=prepared)


def worker(args) -> None:
    shape = common.SHAPES[args.shape]
    data = _dataset(Path(args.data), args.worker)
    clock = common.StepClock()
    out_dir = Path(args.out).with_suffix("")
    if args.worker.startswith("loraft:"):  # an ablation: loraft with these overrides
        extra = [item for item in args.worker.split(":", 1)[1].split(";") if item]
        args.worker_runner = lambda *a: run_loraft(*a, overrides=[*extra, *args.loraft_override])
    runner = args.__dict__.get("worker_runner") or {
        "reference": run_reference, "trl": run_trl,
        "loraft": lambda *a: run_loraft(*a, overrides=args.loraft_override),
        "loraft-ordered": lambda *a: run_loraft(*a, overrides=["train.sampling=random", *args.loraft_override]),
        "loraft-fp32": lambda *a: run_loraft(*a, overrides=["train.sampling=random", "train.precision=fp32",
                                                            *args.loraft_override]),
    }[args.worker]
    measured = common.measured_run(lambda: runner(Path(args.model_dir), data, out_dir, shape, [clock.callback]))
    common.write_json(Path(args.out), {"variant": args.worker, "steps": clock.steps, "losses": clock.losses,
                                       **measured})


# ----------------------------------------------------------------------------------------------- parent side


def summarize(result: dict, shape: common.Shape, counts: dict, peaks: dict, lengths_per_step=None) -> dict:
    steps = result["steps"]
    timed = steps[1:] if len(steps) > 1 else steps
    elapsed = timed[-1]["time"] - (steps[0]["time"] if len(steps) > 1 else 0.0)
    supervised = sum(s["supervised"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    samples = sum(s["samples"] for s in timed)
    step_rates = sorted(s["supervised"] / (b["time"] - a["time"]) for a, b, s in zip(steps, steps[1:], steps[1:]))
    # CPU seconds this process got: a contention-robust clock on a shared machine (threads spinning while a
    # sibling is descheduled still count, so it flatters no one)
    cpu_elapsed = timed[-1].get("cpu_time", float("nan")) - (steps[0].get("cpu_time", 0.0) if len(steps) > 1 else 0.0)
    flops = common.model_flops(counts, tokens, supervised, result.get("attention_flops", 0.0))
    achieved = flops / elapsed / 1e9
    # MFU against the peaks this run itself measured before and after (the machine may be shared)
    peaks = result.get("gemm_peaks", peaks)
    return {
        "variant": result["variant"],
        "supervised_tok_s": supervised / elapsed,
        # every step, warm-up included: each variant's total over the same samples (loraft's length grouping puts
        # the longest samples, which run fastest per token, in step 1, which the figure above leaves out)
        "supervised_tok_s_all_steps": sum(s["supervised"] for s in steps) / steps[-1]["time"] if steps else float("nan"),
        "median_step_supervised_tok_s": step_rates[len(step_rates) // 2] if step_rates else float("nan"),
        "samples_s": samples / elapsed,
        "supervised_tok_per_cpu_s": supervised / cpu_elapsed,
        "padding_share": 1 - tokens / max(sum(s["padded"] for s in timed), 1),
        "peak_rss_gib": result["peak_rss_gib"],
        "peak_gpu_gib": result["peak_gpu_gib"],
        "first_step_s": steps[0]["time"] if steps else float("nan"),
        "wall_s": result["wall_s"],
        "achieved_gflops": achieved,
        "mfu_fp32": achieved / peaks["fp32"],
        "mfu_bf16": achieved / peaks["bf16"],
        "run_gemm_peaks": peaks,
        "losses": [x["loss"] for x in result["losses"]],
        "load_average": result["load_average"],
        "gemm_bf16_gflops": result["gemm_bf16_gflops"],
    }


def loss_gap(losses: list[float], reference: list[float]) -> float:
    """Largest relative difference between two loss curves over their common steps."""
    pairs = list(zip(losses, reference))
    return max(abs(a - b) / abs(b) for a, b in pairs) if pairs else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bloom-small, 64 samples (< 2 minutes)")
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="bloom-1b4-zh")
    parser.add_argument("--samples", type=int, default=160, help="training samples (8 per optimizer step)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from: " + ", ".join(VARIANTS) + "; or loraft:KEY=VALUE[;KEY=VALUE] "
                        "(loraft with those overrides, to measure what one setting gives)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    parser.add_argument("--loraft-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra loraft config override for the loraft variants (repeatable)")
    parser.add_argument("--cpu-isa", choices=["native", *common.CPU_ISA_CAPS], default="native",
                        help="cap the CPU kernels' instruction set (avx2: the fp32-only class, bf16 emulated)")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--report", metavar="RUN_DIR", help="summarize a finished run directory again and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        return rereport(Path(args.report))
    common.reexec_with_isa(args.cpu_isa)
    if args.quick:
        args.shape, args.samples = "bloom-small", 64
    if args.worker:
        worker(args)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = common.SHAPES[args.shape]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = {v for v in variants if v not in VARIANTS and not v.startswith("loraft:")}
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    run_root = common.CACHE / "runs" / f"train-{shape.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_root.mkdir(parents=True, exist_ok=True)

    print(f"[bench] building/loading {shape.name} ({shape.note})", flush=True)
    model_dir = common.ensure_model_dir(shape)
    counts = common.parameter_counts(shape)
    samples = common.make_samples(args.samples, shape, seed=0)
    from datasets import Dataset

    data_dir = run_root / "data"
    Dataset.from_list([{**s, "length": len(s["input_ids"])} for s in samples]).save_to_disk(str(data_dir))
    data_stats = common.describe_samples(samples)
    peaks = {"fp32": common.gemm_peak("fp32"), "bf16": common.gemm_peak("bf16")}
    print(f"[bench] GEMM peak 2048^3: fp32 {peaks['fp32']:.0f} GFLOPS, bf16 {peaks['bf16']:.0f} GFLOPS; "
          f"data {data_stats}", flush=True)

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    summaries = {}
    for variant in variants:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant)
        out = run_root / f"{stem}.json"
        print(f"[bench] {variant} ...", flush=True)
        command = [sys.executable, __file__, "--worker", variant, "--shape", shape.name,
                   "--model-dir", str(model_dir), "--data", str(data_dir), "--out", str(out)]
        command += [f"--loraft-override={override}" for override in args.loraft_override]
        log = run_root / f"{stem}.log"
        with log.open("w") as handle:
            code = subprocess.call(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if code != 0:
            print(f"[bench] {variant} failed (exit {code}); see {log}", flush=True)
            continue
        result = json.loads(out.read_text())
        # attention FLOPs depend only on the samples each step saw; every variant sees all of them once
        timed_fraction = 1 - (result["steps"][0]["samples"] / max(sum(s["samples"] for s in result["steps"]), 1))
        result["attention_flops"] = common.attention_flops(shape, [len(s["input_ids"]) for s in samples]) * timed_fraction
        summaries[variant] = summarize(result, shape, counts, peaks)
        s = summaries[variant]
        print(f"[bench] {variant}: {s['supervised_tok_s']:.1f} supervised tok/s, {s['samples_s']:.3f} samples/s, "
              f"peak RSS {s['peak_rss_gib']:.2f} GiB, MFU fp32 {s['mfu_fp32']:.0%} bf16 {s['mfu_bf16']:.0%}", flush=True)

    report = {
        "command": common.command_line(__file__),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine(), "shape": shape.name, "shape_note": shape.note, "params": counts,
        "data": data_stats, "gemm_peak_gflops": peaks, "results": summaries,
    }
    add_comparisons(summaries)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    common.write_json(run_root / "summary.json", report)
    print(f"[bench] raw results: {run_root}")
    return 0


def add_comparisons(summaries: dict) -> None:
    """Each variant against the reference and trl, in place."""
    reference = summaries.get("reference")
    if reference:
        for name, s in summaries.items():
            s["speedup_vs_reference"] = s["supervised_tok_s"] / reference["supervised_tok_s"]
            s["all_steps_speedup_vs_reference"] = (s["supervised_tok_s_all_steps"]
                                                   / reference["supervised_tok_s_all_steps"])
            s["cpu_time_speedup_vs_reference"] = s["supervised_tok_per_cpu_s"] / reference["supervised_tok_per_cpu_s"]
            s["max_step_loss_gap_vs_reference"] = loss_gap(s["losses"], reference["losses"])
            s["mean_loss_gap_vs_reference"] = (
                abs(sum(s["losses"]) / len(s["losses"]) - sum(reference["losses"]) / len(reference["losses"]))
                / (sum(reference["losses"]) / len(reference["losses"])) if s["losses"] else float("nan"))
    if "trl" in summaries:
        for s in summaries.values():
            s["speedup_vs_trl"] = s["supervised_tok_s"] / summaries["trl"]["supervised_tok_s"]
            s["cpu_time_speedup_vs_trl"] = s["supervised_tok_per_cpu_s"] / summaries["trl"]["supervised_tok_per_cpu_s"]


def rereport(run_root: Path) -> int:
    """Summarize a finished run directory again from its raw per-variant results (e.g. after a new column)."""
    report = json.loads((run_root / "summary.json").read_text())
    shape = common.SHAPES[report["shape"]]
    samples = common.make_samples(report["data"]["samples"], shape, seed=0)
    for variant in list(report["results"]):
        result = json.loads((run_root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', variant)}.json").read_text())
        timed_fraction = 1 - (result["steps"][0]["samples"] / max(sum(s["samples"] for s in result["steps"]), 1))
        result["attention_flops"] = common.attention_flops(shape, [len(s["input_ids"]) for s in samples]) * timed_fraction
        report["results"][variant] = summarize(result, shape, report["params"], report["gemm_peak_gflops"])
    add_comparisons(report["results"])
    print(format_table(report))
    common.write_json(run_root / "summary.json", report)
    return 0


def format_table(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"\nhardware class {machine.get('hardware_class')} (loraft auto precision: {machine.get('auto_precision')}; "
        f"probe bf16/fp32 matmul {machine.get('probe_bf16_speedup') or float('nan'):.2f}x; "
        f"kernel caps {machine.get('kernel_env') or 'none'}); {machine.get('cpu')}, {machine.get('threads')} threads",
        f"{report['shape']}: {report['data']['samples']} samples, mean {report['data']['tokens_mean']:.0f} tokens "
        f"({report['data']['supervised_mean']:.0f} supervised); GEMM peak fp32 {report['gemm_peak_gflops']['fp32']:.0f} "
        f"/ bf16 {report['gemm_peak_gflops']['bf16']:.0f} GFLOPS",
        "| variant | supervised tok/s | all steps | all steps vs reference | samples/s | vs reference | vs trl | per CPU-s vs reference | peak RSS GiB "
        "| MFU fp32 | MFU bf16 | padding | max step-loss gap | mean-loss gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["results"].items():
        lines.append(
            f"| {name} | {s['supervised_tok_s']:.1f} | {s.get('supervised_tok_s_all_steps', float('nan')):.1f} "
            f"| {s.get('all_steps_speedup_vs_reference', float('nan')):.2f}x | {s['samples_s']:.3f} | {s.get('speedup_vs_reference', float('nan')):.2f}x "
            f"| {s.get('speedup_vs_trl', float('nan')):.2f}x | {s.get('cpu_time_speedup_vs_reference', float('nan')):.2f}x "
            f"| {s['peak_rss_gib']:.2f} | {s['mfu_fp32']:.0%} | {s['mfu_bf16']:.0%} "
            f"| {s['padding_share']:.0%} | {s.get('max_step_loss_gap_vs_reference', float('nan')):.2%} "
            f"| {s.get('mean_loss_gap_vs_reference', float('nan')):.2%} |"
        )
    lines.append("\nloss per optimizer step:")
    for name, s in report["results"].items():
        lines.append(f"  {name:15} " + " ".join(f"{x:.4f}" for x in s["losses"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
