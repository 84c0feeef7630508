"""Many adapters on one base in `loraft serve`: peak memory with 1, 4 and 16 adapters loaded, and tokens/s for
8 concurrent clients spread over 4 adapters, batches mixing adapters against one adapter at a time.

    python benchmarks/serve_adapters.py                   # everything (about 5 minutes on 2 cores)
    python benchmarks/serve_adapters.py --rounds 1        # one round of each throughput mode

The base is the real SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized by loraft as `model.name_or_path: FILE.gguf`
loads it), in the dtype `loraft serve` picks on this machine (`generation.dtype: auto`). The adapters are the
gguf-lora preset's (LoRA r 16 on every linear layer of each block): one real run, trained for one step, then copied
16 times with its LoRA B matrices redrawn (seeded), so every adapter changes the function differently.

Each measurement runs in a process of its own, through loraft.serve's in-process app (no socket):
  memory      load_runs with N adapters (and the base), one greedy request per adapter (up to 4), then the peak RSS
  throughput  4 adapters loaded; 8 clients (client i asks adapter i % 4), each sending 4 requests one after the
              other, greedy, exactly 48 answer tokens each (min_tokens = max_tokens): 1,536 tokens a round
              mixed        --max-batch 8: one batch holds every adapter's requests (peft adapter_names)
              one-adapter  --max-batch 8 --one-adapter-per-batch: a batch holds one adapter's requests; the others wait
              serial       --max-batch 1: one request at a time (loraft serve before batching)
              single-adapter  (--modes single-adapter) all 8 clients on one adapter, --max-batch 8: the cost of
                           mixing, against batching one adapter's requests only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.CACHE / "serve-adapters"
COUNT = 16
CLIENTS, REQUESTS, TOKENS = 8, 4, 48
MODES = {"mixed": {"max_batch": 8, "mix_adapters": True}, "one-adapter": {"max_batch": 8, "mix_adapters": False},
         "serial": {"max_batch": 1, "mix_adapters": True},
         # every client on the first adapter, batches of 8: what batching gives without peft's mixed path
         "single-adapter": {"max_batch": 8, "mix_adapters": True}}
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain what a GPU does.",
           "Give three tips for learning a language.", "人工智能是什么？", "How many legs does a spider have?",
           "Translate to French: good morning", "Summarize: the cat sat on the mat all day long.",
           "List four primary colors.", "What is 12 times 12?", "Describe a sunset in one sentence.",
           "Why is the sky blue?", "Name a famous physicist.", "写一句关于春天的话。", "What does HTTP stand for?",
           "Suggest a name for a cat.", "How do plants make food?", "What is the boiling point of water?",
           "Write a haiku about autumn.", "Tell me a fun fact about octopuses.", "What is a prime number?",
           "Recommend a good habit.", "What language is spoken in Brazil?", "Define the word 'serendipity'.",
           "How far is the Moon?", "Give an example of a mammal.", "What is the opposite of 'cold'?",
           "Count from one to five.", "What is photosynthesis?", "Name two planets.", "How are you today?",
           "What is the largest ocean?"]


def ensure_runs() -> list[Path]:
    """16 finished run directories of the gguf-lora preset on SmolLM2, each with its own LoRA B matrices."""
    import torch
    from safetensors.torch import load_file, save_file

    from loraft.config import load_config
    from loraft.presets import preset_path
    from loraft.rundir import read_run_status
    from loraft.smollm2 import smollm2_gguf
    from loraft.train import train

    runs = [ROOT / f"adapter-{index:02d}" for index in range(COUNT)]
    if all(read_run_status(run) == "finished" for run in runs):
        return runs
    ROOT.mkdir(parents=True, exist_ok=True)
    data = ROOT / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": prompt, "output": "A short answer."}, ensure_ascii=False)
                            + "\n" for prompt in PROMPTS), encoding="utf-8")
    first = ROOT / "trained"
    if read_run_status(first) != "finished":
        config = load_config(preset_path("gguf-lora"), [f"model.name_or_path={smollm2_gguf()}", f"data.path={data}",
                                           f"output_dir={first}", "overwrite=true", "train.max_steps=1",
                                           "train.retention=off", "train.per_device_train_batch_size=2",
                                           "train.gradient_accumulation_steps=1"])
        train(config)
    import shutil

    for index, run in enumerate(runs):
        if run.exists():
            shutil.rmtree(run)
        shutil.copytree(first, run)
        weights = load_file(run / "adapter_model.safetensors")
        generator = torch.Generator().manual_seed(index)
        for name, tensor in weights.items():
            if "lora_B" in name:  # as if trained: B away from its zero start, a different direction per adapter
                weights[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(tensor.dtype)
        save_file(weights, run / "adapter_model.safetensors")
    return runs


def peak_rss_mib() -> float:
    """This process's peak RSS since it started (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load(runs: list[Path], **options):
    from loraft.run_access import RunAccess, open_run
    from loraft.serve.adapters import load_runs

    opened = [open_run(run, RunAccess()) for run in runs]
    # the dtype `loraft serve` loads in: the run's generation.dtype (auto: bf16 where this machine computes it fast)
    engine, _ = load_runs(opened, [run.name for run in runs], device="cpu", dtype=opened[0].config.generation.dtype,
                          **options)
    return engine


async def client_round(app, requests: list[tuple[str, str]]) -> list[dict]:
    """Send the requests one after the other; their usage."""
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=600) as client:
        usages = []
        for model, prompt in requests:
            response = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": TOKENS, "min_tokens": TOKENS})
            response.raise_for_status()
            usages.append(response.json()["usage"])
        return usages


def child_memory(count: int) -> dict:
    import asyncio

    from loraft.serve import ServeSettings, create_app

    runs = ensure_runs()[:count]
    before = peak_rss_mib()
    started = time.perf_counter()
    engine = load(runs)
    load_seconds = time.perf_counter() - started
    app = create_app(engine, ServeSettings(max_tokens_cap=TOKENS))
    asyncio.run(client_round(app, [(run.name, PROMPTS[i]) for i, run in enumerate(runs[:4])]))
    return {"adapters": count, "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_load_mib": round(before, 1),
            "load_seconds": round(load_seconds, 2), "dtype": engine.info["dtype"],
            "models_served": len(engine.names)}


def child_throughput(mode: str) -> dict:
    import asyncio

    from loraft.serve import ServeSettings, create_app

    runs = ensure_runs()[:4]
    engine = load(runs, max_queue=64, **MODES[mode])
    app = create_app(engine, ServeSettings(max_tokens_cap=TOKENS))
    asyncio.run(client_round(app, [(runs[0].name, "Hello")]))  # warm up

    async def everyone():
        spread = 1 if mode == "single-adapter" else 4
        work = [[(runs[client % spread].name, PROMPTS[(client * REQUESTS + k) % len(PROMPTS)]) for k in range(REQUESTS)]
                for client in range(CLIENTS)]
        return await asyncio.gather(*[client_round(app, requests) for requests in work])

    engine.most_concurrent_generations = 0
    started = time.perf_counter()
    usages = asyncio.run(everyone())
    seconds = time.perf_counter() - started
    tokens = sum(u["completion_tokens"] for client in usages for u in client)
    return {"mode": mode, "seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "largest_batch": engine.batcher.largest_batch, "peak_rss_mib": round(peak_rss_mib(), 1),
            "dtype": engine.info["dtype"]}


def run_child(kind: str, value) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(value)], capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"{kind} {value} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["mixed", "one-adapter", "serial"])
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--out", default="serve_adapters.json", help="file name under benchmarks/results/")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, value = args.child
        if kind == "runs":
            ensure_runs()
            print(json.dumps({"runs": COUNT}))
            return
        result = child_memory(int(value)) if kind == "memory" else child_throughput(value)
        print(json.dumps(result))
        return
    run_child("runs", COUNT)  # trained in a process of its own: this one stays small
    memory = [] if args.no_memory else [run_child("memory", count) for count in (1, 4, 16)]
    for row in memory:
        print(f"memory {row}", flush=True)
    rounds = []
    for index in range(args.rounds):  # interleaved, so a noisy stretch hits every mode
        for mode in args.modes:
            row = run_child("throughput", mode)
            rounds.append(row)
            print(f"round {index + 1} {row}", flush=True)
    medians = {mode: statistics.median(r["tokens_per_s"] for r in rounds if r["mode"] == mode) for mode in args.modes}
    result = {"date": datetime.date.today().isoformat(), "machine": common.machine(), "memory": memory,
              "rounds": rounds, "median_tokens_per_s": medians,
              "ratios_to_mixed": {mode: round(medians["mixed"] / medians[mode], 2) for mode in medians
                                  if "mixed" in medians and mode != "mixed"}}
    out = Path(__file__).resolve().parent / "results" / args.out
    common.write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
