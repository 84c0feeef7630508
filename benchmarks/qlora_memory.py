"""Peak memory of LoRA training at the bloom-1b4-zh shape: fp32, bf16 and QLoRA (NF4, bitsandbytes).

Each mode runs `loraft.train.train` with the recipe's preset (bloom-1b4-zh-lora: LoRA r=8 on .*\\.1.*query_key_value,
word_embeddings trained in full, batch 1 x grad-accum 8, 256 tokens) in a fresh process, on the same token-id samples,
for a few optimizer steps; the parent reads the child's peak RSS (and peak CUDA memory on a GPU). Random weights of
the real shape (benchmarks/common.py), so the memory is the real model's.

    python benchmarks/qlora_memory.py [--steps 2] [--modes fp32,bf16,nf4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "nf4": ["model.quantization=nf4", "train.precision=bf16"],
    "nf4-fp32": ["model.quantization=nf4", "train.precision=fp32"],
}


def worker(mode: str, steps: int, out: Path) -> None:
    import torch
    from datasets import Dataset

    from loraft.config import load_config
    from loraft.train import train

    shape = common.SHAPES["bloom-1b4-zh"]
    model_dir = common.ensure_model_dir(shape)
    samples = common.make_samples(8 * steps, shape)
    data = Dataset.from_list([{**s, "length": len(s["input_ids"])} for s in samples])
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "bloom-1b4-zh-lora.yaml", [
        f"model.name_or_path={model_dir}", f"output_dir={out.with_suffix('')}", "overwrite=true",
        f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=100000", *MODES[mode],
    ])
    from types import SimpleNamespace

    from transformers import TrainerCallback

    during: dict[str, float] = {"rss": 0.0, "anon": 0.0}

    class Sample(TrainerCallback):
        """Resident memory while training (at each micro-step's end), apart from the load's transient peak:
        all of it, and the anonymous part (allocated, not file pages of the memory-mapped checkpoint)."""

        def on_substep_end(self, args, state, control, **kwargs):
            self.read()

        def on_step_end(self, args, state, control, **kwargs):
            self.read()

        @staticmethod
        def read():
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
            during["rss"] = max(during["rss"], int(fields["VmRSS"].split()[0]) / 2**20)
            during["anon"] = max(during["anon"], int(fields["RssAnon"].split()[0]) / 2**20)

    started = time.perf_counter()
    train(config, prepared=SimpleNamespace(train=data, eval=None, report={"source": "benchmark token ids"}),
          progress_bar=False, callbacks=[Sample()])
    metrics = [json.loads(line) for line in (out.with_suffix("") / "metrics.jsonl").read_text().splitlines()]
    common.write_json(out, {
        "mode": mode, "wall_s": time.perf_counter() - started, "peak_rss_gib": common.peak_rss_gib(),
        "training_rss_gib": during["rss"], "training_anon_gib": during["anon"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "losses": [m["loss"] for m in metrics if "loss" in m],
    })


def format_report(report: dict) -> str:
    """The markdown table of a report.json (what docs/benchmarks.md shows)."""
    machine, results = report["machine"], report["results"]
    reference = next((r for r in results if r["mode"] == "fp32"), None)
    lines = [f"machine: {machine['cpu']} ({machine['hardware_class']}), {machine['cores']} cores, torch "
             f"{machine['torch']}; {report['steps']} optimizer steps of 8 samples (<= 256 tokens)", "",
             "| mode | RSS while training (GiB) | vs fp32 LoRA | of it allocated, not checkpoint file pages (GiB) | "
             "peak RSS incl. loading (GiB) | peak GPU (GiB) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['training_rss_gib'] / reference['training_rss_gib']:.2f}x" if reference else ""
        gpu = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['training_rss_gib']:.2f} | {ratio} | {r['training_anon_gib']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | {gpu} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--modes", default="fp32,bf16,nf4")
    parser.add_argument("--report", metavar="REPORT_JSON", help="print a finished run's table again and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, Path(args.out))
        return 0
    if args.report:
        print(format_report(json.loads(Path(args.report).read_text())))
        return 0
    common.ensure_model_dir(common.SHAPES["bloom-1b4-zh"])  # built once, outside the measured processes
    run_root = common.CACHE / "runs" / f"qlora-memory-{int(time.time())}"
    run_root.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        out = run_root / f"{mode}.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps), "--out", str(out)],
                       check=True)
        result = json.loads(out.read_text())
        children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result["peak_rss_gib"] = max(result["peak_rss_gib"], children_peak / 2**20 if children_peak > before else 0)
        results.append(result)
        print(f"{mode}: peak RSS {result['peak_rss_gib']:.2f} GiB (training {result['training_rss_gib']:.2f}, "
              f"anonymous {result['training_anon_gib']:.2f}), {result['wall_s']:.0f} s, losses {result['losses']}",
              flush=True)
    report = {"machine": common.machine(), "steps": args.steps, "results": results}
    print("\n" + format_report(report))
    common.write_json(run_root / "report.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
