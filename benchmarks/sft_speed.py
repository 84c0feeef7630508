"""SFT step throughput, whole-process time and peak RSS: `loraft train` against TRL's SFTTrainer.

    python benchmarks/sft_speed.py --quick                        # SmolLM2, 3 steps x 4 samples (bloom-small x 8)
    python benchmarks/sft_speed.py                                # SmolLM2-135M-Instruct, 60 steps x 16 samples
    python benchmarks/sft_speed.py --model bloom-1b4-zh           # the recipe's shape, 20 steps x 8 samples
    python benchmarks/sft_speed.py --cpu-isa avx2                 # the fp32-only class on a CPU that has more

Models (--model):
  smollm2       the real model, SmolLM2-135M-Instruct (Q4_1 GGUF, loraft.smollm2). loraft trains the .gguf file as a
                user does: the `gguf-lora` preset (LoRA r 16, alpha 32, dropout 0.05 on every linear layer of a block,
                lr 2e-4 cosine, batch 8 x grad-accum 2, max_length 512, the model's chat template), its data stage
                reading a messages .jsonl. TRL loads the file's dequantized folder (loraft.gguf_base.hf_folder) in the
                dtype loraft's plan loads it (bf16 where the CPU has bf16, else fp32; TRL's own default is fp32) and
                tokenizes the same records in its conversational prompt-completion format. The records are a narrow
                task drawn from --seed: an ISO date as day/month/year, or a word in capitals in brackets.
  bloom-1b4-zh  the recipe's shape with random weights and its adapter (LoRA on `.*\\.1.*query_key_value`,
                word_embeddings trained in full, lr 5e-5, batch 1 x grad-accum 8, max_length 256) on alpaca-zh-like
                token ids (common.make_samples): loraft gets them pre-tokenized, TRL as a pre-tokenized dataset with a
                completion_mask, as TRL documents. --quick: the bloom-small shape.

Variants, each in its own process (its peak RSS is its own), all with one LoraConfig (loraft.model's, from the run's
config), learning rate, schedule, batch, accumulation, max_length and seed, over the same samples:
  trl          SFTTrainer(model=<folder>, args=SFTConfig(...), train_dataset=..., peft_config=LoraConfig(...)), TRL's
               defaults (gradient checkpointing, its fused lm_head loss, loss on the completion only) in the precision
               loraft's plan picks: TRL's bf16=True default is emulated on CPUs without bf16 (as in dpo_speed.py).
  trl-nogc     the same with gradient_checkpointing=False.
  trl-fastest  trl-nogc with padding_free=True: each micro-batch one row, no padding, the samples kept apart by their
               position_ids (so Llama-type models only, not BLOOM); TRL then wants max_length=None, which cuts nothing
               here. Packing is left out: it changes which samples share a step.
  trl-nogc-eager, trl-fastest-eager  (not in the default --variants) those two with the model loaded with
               attn_implementation="eager", the attention loraft's autotune picks where the CPU's sdpa backward is
               slow: TRL given the same attention.
  loraft       loraft.train.train() with loraft's defaults (autotune, the length-grouped sampler: the same samples in
               another order) and the objective TRL trains: train.retention=off.
  loraft-guard all of loraft's defaults, the retention guard included (train.retention auto: on for a LoRA on an
               unquantized base; a forward/backward on 2 general conversations a step, work TRL does not do);
               smollm2 only (the recipe's preset has it off).
  loraft-fp32  train.precision=fp32, train.sampling=random (TRL's order), adapter dropout 0, no guard, on exactly the
  trl-fp32     ids and labels TRL trains on; trl-fp32 is trl in fp32 with dropout 0. Their losses must match.
  loraft-ordered  (only when named) loraft with train.sampling=random: its sampler's share of the speed.
  loraft-sub256, loraft-gc  (only when named) loraft held to less memory: sub-batches of at most 256 tokens
               (train.micro_batch_tokens=256) instead of the autotune's, or activations recomputed in the backward
               (train.gradient_checkpointing=true), as TRL's documented default does; both train.retention=off.

Reported per variant: median seconds per optimizer step and tokens/s (non-padding tokens), both without the first
step (warm-up); the training's time; the whole process's time (interpreter start to the end of training, less this
script's GEMM readings; loraft's includes the autotune per machine and shape and the guard's targets per base where
its caches lacked them: said, and left out under "caches warm"); peak RSS; each step's loss, and a checksum of its
token ids (the same samples in the same order). TRL tokenizes the records itself; its input ids must equal loraft's
or the variant fails. TRL's completion also holds the newline after <|im_end|>, which loraft's template does not
supervise: the fp32 pair trains on TRL's labels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ["trl", "trl-nogc", "trl-fastest", "loraft", "loraft-guard", "loraft-fp32", "trl-fp32", "loraft-ordered",
            "trl-nogc-eager", "trl-fastest-eager", "loraft-sub256", "loraft-gc"]
DEFAULT_VARIANTS = VARIANTS[:7]
BASELINES = ("trl", "trl-nogc", "trl-fastest", "trl-nogc-eager", "trl-fastest-eager")
LORAFT_OVERRIDES = {"loraft": ["train.retention=off"], "loraft-guard": [],
                    "loraft-ordered": ["train.retention=off", "train.sampling=random"],
                    "loraft-fp32": ["train.precision=fp32", "train.sampling=random", "adapter.dropout=0",
                                    "train.retention=off"],
                    "trl-fp32": ["train.precision=fp32", "adapter.dropout=0"],
                    # loraft held to less memory (named only): smaller sub-batches, or TRL's recomputation
                    "loraft-sub256": ["train.retention=off", "train.micro_batch_tokens=256"],
                    "loraft-gc": ["train.retention=off", "train.gradient_checkpointing=true"]}
# loraft's once-only costs (per machine and shape; per base and template), as it logs them when not read from its cache
ONCE = {"autotune_s": r"autotune: ([0-9.]+) s;",
        "guard_targets_s": r"retention guard: the base's next-token targets on \d+ general conversations in ([0-9.]+)"}
COUNTS = (*common.SUPERVISED_COUNTS, "checksum")
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("apple river stone cloud garden window mirror candle forest bridge pencil rocket violin harbor island "
         "ladder marble needle orange pepper silver summer thunder tiger velvet winter yellow anchor basket castle "
         "dragon engine feather glacier hammer jungle kettle lemon meadow").split()


# ----------------------------------------------------------------------------------------------- the data


def draw_task(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of a narrow task the base cannot do exactly: an ISO date as day/month/year, or a word
    in capitals in brackets (benchmarks/grpo_speed.py draws its prompts here too)."""
    if rng.random() < 0.5:
        day = datetime.date(1990, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 50))
        return f"Write the date {day.isoformat()} as day/month/year", day.strftime("%d/%m/%Y")
    word = rng.choice(WORDS)
    return f"Write the word in brackets, in capitals: {word}", f"[{word.upper()}]"


def make_records(count: int, seed: int) -> list[dict]:
    """Chat records of the narrow task (draw_task), drawn from `seed`."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        question, answer = draw_task(rng)
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def gguf_path() -> Path:
    """loraft's copy of the SmolLM2 file, else the test suite's, else fetched (loraft.smollm2)."""
    from loraft.errors import RunError
    from loraft.smollm2 import smollm2_gguf

    test_copy = Path.home() / ".cache" / "loraft-test" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        return smollm2_gguf(fetch=False)
    except RunError:  # not downloaded yet
        return test_copy if test_copy.is_file() else smollm2_gguf()


def loraft_config(args, out_dir: Path, overrides=()):
    """The run's loraft config: the preset a user of this model gets, with the benchmark's batch, one epoch over
    exactly steps x batch samples, logging every step and no checkpoint within the run."""
    from loraft.config import load_config
    from loraft.presets import preset_path

    layout = [f"train.per_device_train_batch_size={args.batch // args.accumulation}",
              f"train.gradient_accumulation_steps={args.accumulation}", "train.num_train_epochs=1"]
    if args.model == "smollm2":
        return load_config(preset_path("gguf-lora"), [
            f"model.name_or_path={args.gguf}", f"data.path={args.run_root}/records.jsonl", f"output_dir={out_dir}",
            "overwrite=true", "train.logging_steps=1", "train.save_steps=100000", *layout, *overrides])
    return common.recipe_config(common.SHAPES[args.shape], Path(args.model_dir), out_dir, [*layout, *overrides])


def prepare_data(args) -> dict:
    """Write the samples (records.jsonl for loraft's data stage; `data`: TRL's columns and the reference ids and
    labels, loraft's encoding of the records) under args.run_root; returns their description."""
    from datasets import Dataset

    if args.model == "smollm2":
        from loraft.data import read_with_report, tokenize_conversations
        from loraft.model import load_tokenizer
        from loraft.templates import get_template

        records = make_records(args.steps * args.batch, args.seed)
        path = Path(args.run_root) / "records.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        config = loraft_config(args, Path(args.run_root) / "unused")
        tokenizer = load_tokenizer(str(args.gguf))
        conversations, _ = read_with_report(str(path), config.data)
        encoded, _ = tokenize_conversations(conversations, tokenizer, get_template(config.data.template, tokenizer),
                                            config.data.max_length)
        rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:], **e} for r, e in zip(records, encoded)]
    else:
        samples = common.make_samples(args.steps * args.batch, common.SHAPES[args.shape], seed=args.seed)
        rows = [{**s, "length": len(s["input_ids"])} for s in samples]
    for row in rows:  # TRL's completion: every token after the prompt (here the newline after <|im_end|> too)
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        row["trl_labels"] = [-100] * start + row["input_ids"][start:]
        row["completion_mask"] = [int(label != -100) for label in row["labels"]]
    Dataset.from_list(rows).save_to_disk(str(Path(args.run_root) / "data"))
    lengths = [len(r["input_ids"]) for r in rows]
    return {"samples": len(rows), "tokens_mean": statistics.mean(lengths), "tokens_max": max(lengths),
            "supervised_mean_loraft": statistics.mean(sum(x != -100 for x in r["labels"]) for r in rows),
            "supervised_mean_trl": statistics.mean(sum(x != -100 for x in r["trl_labels"]) for r in rows)}


# ----------------------------------------------------------------------------------------------- worker side


def count_batch(batch) -> dict:
    """common.count_supervised, with padding-free rows counted by their samples, and a checksum of the samples'
    ids by position within each sample (the same for any padding, row order or padding-free layout)."""
    import torch

    counts = common.count_supervised(batch)
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is None:  # padding-free: positions restart at every sample
        positions = batch["position_ids"] + 1
        counts["samples"] = int((batch["position_ids"] == 0).sum())
    else:
        positions = torch.cumsum(mask, dim=1) * mask
    counts["checksum"] = int((ids * positions).sum())
    return counts


def run_trl(args, variant: str, data, out_dir: Path, callbacks) -> dict:
    from transformers import AutoTokenizer, set_seed

    from loraft.model import build_peft_config
    from loraft.precision import resolve_precision

    config = loraft_config(args, out_dir, LORAFT_OVERRIDES.get(variant, []))
    precision = resolve_precision(config.train.precision)  # the precision loraft's plan picks for this run
    # the weights in the dtype loraft's plan loads them in (TRL's own default: float32)
    model, init = args.model_dir, {"dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")}
    if args.model == "smollm2":
        from loraft import gguf_base

        init["variant"] = precision if precision in ("bf16", "fp16") else "fp32"
        model = gguf_base.hf_folder(str(args.gguf), weights=init["variant"])
        train_dataset = data.select_columns(["prompt", "completion"])
    else:
        train_dataset = data.select_columns(["input_ids", "completion_mask"])
    fastest = variant.startswith("trl-fastest")
    if variant.endswith("-eager"):  # the model loaded with transformers' eager attention, as loraft's autotune may
        init["attn_implementation"] = "eager"
    train = config.train
    set_seed(train.seed)  # as loraft's train() does before loading: the same LoRA initialisation
    trainer = common.sft_trainer(
        model, train_dataset, AutoTokenizer.from_pretrained(model), build_peft_config(config.adapter), callbacks,
        out_dir, per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type, warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, seed=train.seed, max_length=None if fastest else config.data.max_length,
        completion_only_loss=True, bf16=precision == "bf16", fp16=precision == "fp16", model_init_kwargs=init,
        gradient_checkpointing=variant in ("trl", "trl-fp32"), padding_free=fastest)
    prepared = trainer.train_dataset
    if prepared["input_ids"] != data["input_ids"]:
        raise SystemExit(f"{variant}: TRL's input ids differ from the ids loraft trains on")
    if prepared["labels"] != data["trl_labels"]:
        raise SystemExit(f"{variant}: TRL's labels are not the prompt-masked ids this benchmark expects")
    trainer.train()
    return {"precision": precision, "weights_dtype": init["dtype"],
            "gradient_checkpointing": trainer.args.gradient_checkpointing, "padding_free": trainer.padding_free,
            "attention": trainer.model.config._attn_implementation, "optimizer": str(trainer.args.optim.value),
            "token_ids_equal_loraft": True}


def run_loraft(args, variant: str, data, out_dir: Path, callbacks) -> dict:
    from loraft.train import train

    config = loraft_config(args, out_dir, LORAFT_OVERRIDES[variant])
    prepared = None  # smollm2: loraft's own data stage reads records.jsonl, as `loraft train` does
    if variant == "loraft-fp32" or args.model != "smollm2":  # fp32: the labels TRL trains on
        columns = ["input_ids", "attention_mask", "trl_labels" if variant == "loraft-fp32" else "labels", "length"]
        columns = data.select_columns(columns)
        columns = columns.rename_column("trl_labels", "labels") if variant == "loraft-fp32" else columns
        prepared = SimpleNamespace(train=columns, eval=None, report={"source": "benchmark token ids"})
    run_dir = train(config, callbacks=callbacks, prepared=prepared, progress_bar=False)
    plan = json.loads((run_dir / "loraft_run.json").read_text())["plan"]
    keys = ("precision", "weights", "gradient_checkpointing", "attention", "attention_patch", "speed_path", "optimizer",
            "sampler", "micro_batch_tokens", "samples_per_batch", "accumulation", "fused_loss", "packing", "retention")
    return {key: plan.get(key) for key in keys}


def worker(args) -> None:
    import logging
    import re

    import psutil
    from datasets import load_from_disk

    data = load_from_disk(str(Path(args.run_root) / "data"))
    clock = common.StepClock(count=count_batch, keys=COUNTS)
    out = Path(args.run_root) / f"{args.worker}.json"
    times, setup, once = {}, {}, {}

    class Once(logging.Handler):  # what loraft measured or computed in this process, not read from its caches
        def emit(self, record):
            for key, pattern in ONCE.items():
                found = re.match(pattern, record.getMessage())
                once[key] = once.get(key, 0) + (float(found.group(1)) if found else 0)

    logging.getLogger("loraft").addHandler(Once())
    logging.getLogger("loraft").setLevel(logging.INFO)

    def run():
        times["start"] = time.time()
        runner = run_loraft if args.worker.startswith("loraft") else run_trl
        setup.update(runner(args, args.worker, data, out.with_suffix(""), [clock.callback]))
        times["end"] = time.time()

    from loraft.precision import resolve_precision

    called = time.time()
    bf16 = resolve_precision("auto") == "bf16" and not args.worker.endswith("fp32")
    measured = common.measured_run(run, dtypes=("fp32", "bf16") if bf16 else ("fp32",))
    # interpreter start to the end of training, less the GEMM readings before it
    process_s = times["end"] - psutil.Process().create_time() - (times["start"] - called)
    common.write_json(out, {"variant": args.worker, "setup": setup, "steps": clock.steps, "losses": clock.losses,
                            "process_s": process_s, **{key: once.get(key) or None for key in ONCE}, **measured})


# ----------------------------------------------------------------------------------------------- parent side


def summarize(result: dict) -> dict:
    steps = result["steps"]
    timed = steps[1:] if len(steps) > 1 else steps
    elapsed = timed[-1]["time"] - (steps[0]["time"] if len(steps) > 1 else 0.0)
    step_s = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])] or [steps[0]["time"]]
    return {
        "setup": result["setup"], "steps": len(steps), "median_step_s": statistics.median(step_s), "step_s": step_s,
        "first_step_s": steps[0]["time"], "train_s": steps[-1]["time"], "process_s": result["process_s"],
        **{key: result.get(key) for key in ONCE},
        "tokens_s": sum(s["tokens"] for s in timed) / elapsed, "samples_s": sum(s["samples"] for s in timed) / elapsed,
        "supervised": sum(s["supervised"] for s in steps),
        "padding_share": 1 - sum(s["tokens"] for s in timed) / max(sum(s["padded"] for s in timed), 1),
        "peak_rss_gib": result["peak_rss_gib"], "peak_gpu_gib": result["peak_gpu_gib"],
        "losses": [x["loss"] for x in result["losses"]], "step_checksums": [s["checksum"] for s in steps],
        "load_average": result["load_average"], "gemm_fp32_gflops": result["gemm_fp32_gflops"],
        "gemm_bf16_gflops": result.get("gemm_bf16_gflops"),
    }


def add_comparisons(results: dict) -> None:
    """Each variant against each TRL baseline (steady-state tokens/s, process time, peak RSS), its order, and the
    fp32 pair's loss difference, in place."""
    def cached(r):  # the process time of a later run of the same shape and base: loraft's caches hold both by then
        return r["process_s"] - sum(r[key] or 0 for key in ONCE)

    for base_name in (*BASELINES, "trl-fp32"):
        base = results.get(base_name)
        for s in results.values() if base else ():
            s[f"vs_{base_name}"] = {
                "speed": s["tokens_s"] / base["tokens_s"], "process": base["process_s"] / s["process_s"],
                "process_tuned": cached(base) / cached(s),
                "train": base["train_s"] / s["train_s"], "rss": s["peak_rss_gib"] / base["peak_rss_gib"],
                "same_steps": s["step_checksums"] == base["step_checksums"],
                "same_samples": sum(s["step_checksums"]) == sum(base["step_checksums"]),
                "max_loss_diff": max((abs(a - b) for a, b in zip(s["losses"], base["losses"])), default=None)}


def format_report(report: dict) -> str:
    machine, data, results = report["machine"], report["data"], report["results"]
    lines = [(f"\n{report['model']} ({report['model_note']}); {machine['cpu']}, {machine['threads']} threads, "
              f"hardware class {machine['hardware_class']} (loraft's precision here: {machine['auto_precision']})"),
             (f"{data['samples']} samples, {report['batch']} per optimizer step "
              f"({report['batch'] // report['accumulation']} x grad-accum {report['accumulation']}); "
              f"{data['tokens_mean']:.1f} tokens a sample on average, {data['supervised_mean_loraft']:.1f} supervised "
              f"by loraft, {data['supervised_mean_trl']:.1f} by TRL"),
             ("| variant | precision | grad ckpt | s/step (median) | tokens/s | train s | process s | peak RSS GiB "
              "| same steps as trl | load avg |"), "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for name, s in results.items():
        setup, same = s["setup"], s.get("vs_trl", {})
        order = "" if not same else "yes" if same["same_steps"] else "same samples" if same["same_samples"] else "NO"
        tuned = ", ".join(f"{key.removesuffix('_s').replace('_', ' ')} {s[key]:.0f} s" for key in ONCE if s.get(key))
        tuned = f" ({tuned})" if tuned else ""
        extra = " padding-free" if setup.get("padding_free") else ""
        checkpointing = "yes" if setup.get("gradient_checkpointing") else "no"
        lines.append(f"| {name} | {setup.get('precision')}{extra} | {checkpointing} | {s['median_step_s']:.3f} "
                     f"| {s['tokens_s']:.0f} | {s['train_s']:.1f} | {s['process_s']:.1f}{tuned} "
                     f"| {s['peak_rss_gib']:.2f} | {order} | {s['load_average'][0]:.1f} / {s['load_average'][1]:.1f} |")
    lines += [("\nloraft / TRL (speed: steady-state tokens/s; process: whole-process time, and without loraft's "
               "once-per-shape autotune and once-per-base guard targets; train: all steps; RSS: peak RSS, lower is "
               "better):"),
              ("| loraft variant | TRL variant | speed | process | process, caches warm | train | RSS "
               "| max \\|Δloss\\| |"),
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    pairs = [(name, b) for name in ("loraft", "loraft-guard", "loraft-sub256", "loraft-gc") for b in BASELINES]
    for name, base in pairs + [("loraft-ordered", "trl"), ("loraft-fp32", "trl-fp32")]:
        c = results.get(name, {}).get(f"vs_{base}")
        if c:
            diff = c["max_loss_diff"] if name == "loraft-fp32" else None
            lines.append(f"| {name} | {base} | {c['speed']:.2f}x | {c['process']:.2f}x | {c['process_tuned']:.2f}x "
                         f"| {c['train']:.2f}x "
                         f"| {c['rss']:.2f} | {'' if diff is None else f'{diff:.1e}'} |")
    lines.append("\nloss per optimizer step:")
    for name, s in results.items():
        lines.append(f"  {name:14} " + " ".join(f"{x:.5f}" for x in s["losses"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "bloom-1b4-zh"], default="smollm2")
    parser.add_argument("--quick", action="store_true", help="3 steps: SmolLM2 x 4 samples, bloom-small x 8")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: smollm2 60, bloom-1b4-zh 20)")
    parser.add_argument("--batch", type=int, help="samples per optimizer step (default: the preset's, 16 and 8)")
    parser.add_argument("--seed", type=int, default=0, help="the samples' seed")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="from: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, help="torch threads per run (default: all cores)")
    parser.add_argument("--cpu-isa", choices=["native", *common.CPU_ISA_CAPS], default="native",
                        help="cap the CPU kernels' instruction set (avx2: the fp32-only class, bf16 emulated)")
    parser.add_argument("--json", help="the report (default: benchmarks/results/DATE-CLASS-sft_speed-MODEL.json)")
    for hidden in ("--worker", "--run-root", "--model-dir", "--gguf", "--shape"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.reexec_with_isa(args.cpu_isa)
    if args.worker:
        worker(args)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    smollm2 = args.model == "smollm2"
    args.shape = None if smollm2 else "bloom-small" if args.quick else "bloom-1b4-zh"
    args.steps = args.steps or (3 if args.quick else 60 if smollm2 else 20)
    args.batch = args.batch or (4 if args.quick and smollm2 else 16 if smollm2 else 8)
    preset_accumulation = 2 if smollm2 else 8
    args.accumulation = preset_accumulation if args.batch % preset_accumulation == 0 else 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(set(variants) - set(VARIANTS)))}")
    for variant, why in (("trl-fastest", "padding_free needs position_ids, which BLOOM does not take"),
                         ("loraft-guard", "the recipe's preset has the retention guard off")):
        if not smollm2 and variant in variants:
            variants.remove(variant)
            print(f"[bench] {variant} left out: {why}", flush=True)
    now = datetime.datetime.now()
    name = "smollm2" if smollm2 else args.shape
    args.run_root = str(common.CACHE / "runs" / f"sft-{name}-{now:%Y%m%d-%H%M%S}")
    Path(args.run_root).mkdir(parents=True, exist_ok=True)

    if smollm2:
        from loraft import gguf_base
        from loraft.precision import resolve_precision

        args.gguf, note = str(gguf_path()), "SmolLM2-135M-Instruct, Q4_1 GGUF, dequantized"
        print(f"[bench] {args.gguf}: dequantizing once (loraft.gguf_base.hf_folder)", flush=True)
        for weights in {resolve_precision("auto"), "fp32"}:
            gguf_base.hf_folder(args.gguf, weights=weights)  # cached for both sides, outside every timed process
    else:
        args.model_dir, note = str(common.ensure_model_dir(common.SHAPES[args.shape])), common.SHAPES[args.shape].note
    data = prepare_data(args)
    print(f"[bench] data {data}", flush=True)

    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    passed = ["--model", args.model, "--run-root", args.run_root, "--steps", str(args.steps), "--batch",
              str(args.batch), "--accumulation", str(args.accumulation), "--seed", str(args.seed)]
    passed += [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in ("gguf", "model_dir", "shape")
               if getattr(args, key)]
    results = {}
    for variant in variants:
        print(f"[bench] {variant} ...", flush=True)
        log = Path(args.run_root) / f"{variant}.log"
        with log.open("w") as handle:
            code = subprocess.call([sys.executable, __file__, "--worker", variant, *passed], env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
        if code != 0:
            print(f"[bench] {variant} failed (exit {code}); see {log}", flush=True)
            continue
        results[variant] = s = summarize(json.loads((Path(args.run_root) / f"{variant}.json").read_text()))
        print(f"[bench] {variant}: {s['median_step_s']:.3f} s/step, {s['tokens_s']:.0f} tokens/s, process "
              f"{s['process_s']:.1f} s, peak RSS {s['peak_rss_gib']:.2f} GiB", flush=True)

    add_comparisons(results)
    machine = common.machine()
    report = {"command": common.command_line(__file__), "date": now.isoformat(timespec="seconds"), "machine": machine,
              "model": name, "model_note": note, "steps": args.steps, "batch": args.batch,
              "accumulation": args.accumulation, "seed": args.seed, "data": data, "results": results}
    print(format_report(report))
    stem = f"{now:%Y-%m-%d}-{machine['hardware_class']}-sft_speed-{name}"
    path = Path(args.json) if args.json else RESULTS / f"{stem}.json"
    common.write_json(path, report)
    common.write_json(Path(args.run_root) / "summary.json", report)
    print(f"[bench] report: {path}; raw results: {args.run_root}")
    return 0 if len(results) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
