"""Generation speed: the reference's `pipeline("text-generation")` on the unmerged peft model vs `loraft generate`.

    python benchmarks/generate_speed.py --quick                  # small BLOOM, < 2 minutes
    python benchmarks/generate_speed.py --shape bloom-1b4-zh

Both answer the same prompts ("Human: {instruction}\\n\\nAssistant: ") greedily with the reference's
max_length=64 (prompt + answer tokens), batch 1, from the same random-weight base and the same adapter
(LoRA on the reference's regex, a changed word_embeddings copy). Each side runs in its own process.
Batched throughput (batch 8, the same number of new tokens) is reported beside it.

  reference  pipeline("text-generation", model=PeftModel(fp32 base), tokenizer)(prompt, max_length=64)
  loraft     loraft.generate.load_run(run_dir) + generate_batch(...), what `loraft generate` runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MAX_LENGTH = 64  # the reference's pipeline(..., max_length=64)
BATCH = 8


def prompts(count: int, seed: int = 0) -> list[str]:
    """Instructions of 6-20 words of the benchmark tokenizer (one token each)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(f"t{i}" for i in rng.integers(4, 64, rng.integers(6, 21))) for _ in range(count)]


def ensure_run_dir(shape: common.Shape, model_dir: Path) -> Path:
    """A finished loraft run directory for `shape`: the reference adapter with non-zero LoRA B and a changed
    embedding copy (so the adapter really changes the function), saved with loraft's own writers."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraft.config import load_config, save_config
    from loraft.templates import get_template
    from loraft.files import write_json_atomically
    from loraft.rundir import RUN_FILE
    from loraft.train import save_tokenizer_with_template

    run_dir = common.CACHE / "runs" / f"generate-{shape.name}"
    if (run_dir / RUN_FILE).is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=shape.target_modules,
                                             modules_to_save=list(shape.modules_to_save)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.01)
    model.save_pretrained(run_dir)
    config = load_config(None, [f"model.name_or_path={model_dir}", f"output_dir={run_dir}",
                                f"adapter.target_modules={shape.target_modules}",
                                f"adapter.modules_to_save=[{','.join(shape.modules_to_save)}]"])
    save_config(config, run_dir / "config.yaml")
    save_tokenizer_with_template(AutoTokenizer.from_pretrained(model_dir), get_template("human_assistant"), run_dir)
    write_json_atomically(run_dir / RUN_FILE, {"status": "finished", "base_model": str(model_dir),
                                               "template": "human_assistant"})
    return run_dir


# ----------------------------------------------------------------------------------------------- workers


def run_reference(model_dir: Path, run_dir: Path, texts: list[str]) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(run_dir))
    # the recipe's pipeline, on the device loraft generates on (a GPU where there is one), for a fair comparison
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer,
                         device=0 if torch.cuda.is_available() else None)
    inputs = ["Human: {}\n{}".format(text, "").strip() + "\n\nAssistant: " for text in texts]
    prompt_lengths = [len(tokenizer(text)["input_ids"]) for text in inputs]

    def new_tokens(outputs, prompt_length):
        return len(outputs[0]["generated_token_ids"]) - prompt_length

    generator(inputs[0], max_length=MAX_LENGTH, return_tensors=True)  # warm-up
    single_tokens, started = 0, time.perf_counter()
    for text, length in zip(inputs, prompt_lengths):
        single_tokens += new_tokens(generator(text, max_length=MAX_LENGTH, return_tensors=True), length)
    single_time = time.perf_counter() - started
    tokenizer.padding_side = "left"
    started = time.perf_counter()
    outputs = generator(inputs, max_length=MAX_LENGTH, return_tensors=True, batch_size=BATCH)
    batched_time = time.perf_counter() - started
    batched_tokens = sum(new_tokens(o, n) for o, n in zip(outputs, prompt_lengths))
    del torch
    return {"single": [single_tokens, single_time], "batched": [batched_tokens, batched_time],
            "prompt_lengths": prompt_lengths}


def run_loraft(model_dir: Path, run_dir: Path, texts: list[str]) -> dict:
    from loraft.config import GenerationConfig
    from loraft.generate import encode_prompt, generate_batch, load_run

    model, tokenizer, template, _ = load_run(run_dir, dtype="auto")
    counted = []
    generate = model.generate

    def counting_generate(*args, **kwargs):  # instrumentation only: how many tokens came out
        output = generate(*args, **kwargs)
        counted.append(output.shape[0] * (output.shape[1] - kwargs["input_ids"].shape[1]))
        return output

    model.generate = counting_generate
    conversations = [[{"role": "user", "content": text}] for text in texts]
    prompt_lengths = [len(encode_prompt(tokenizer, template, c)) for c in conversations]

    def settings(prompt_length):
        return GenerationConfig(max_new_tokens=MAX_LENGTH - prompt_length, temperature=0)

    generate_batch(model, tokenizer, template, conversations[:1], settings(prompt_lengths[0]), batch_size=1)
    counted.clear()
    started = time.perf_counter()
    for conversation, length in zip(conversations, prompt_lengths):
        generate_batch(model, tokenizer, template, [conversation], settings(length), batch_size=1)
    single_time = time.perf_counter() - started
    single_tokens = sum(counted)
    counted.clear()
    # batched: every prompt gets the answer length the reference's max_length leaves the shortest one
    started = time.perf_counter()
    generate_batch(model, tokenizer, template, conversations, settings(max(prompt_lengths)), batch_size=BATCH)
    batched_time = time.perf_counter() - started
    return {"single": [single_tokens, single_time], "batched": [sum(counted), batched_time],
            "prompt_lengths": prompt_lengths}


def worker(args) -> None:
    texts = prompts(args.prompts)
    runner = {"reference": run_reference, "loraft": run_loraft}[args.worker]
    result = runner(Path(args.model_dir), Path(args.run_dir), texts)
    result.update(peak_rss_gib=common.peak_rss_gib(), load_average=common.load_average())
    common.write_json(Path(args.out), result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bloom-small, 8 prompts")
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="bloom-1b4-zh")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--worker", choices=["reference", "loraft"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape = "bloom-small"
    if args.worker:
        worker(args)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = common.SHAPES[args.shape]
    model_dir = common.ensure_model_dir(shape)
    run_dir = ensure_run_dir(shape, model_dir)
    out_root = common.CACHE / "runs" / f"generate-{shape.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out_root.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in ("reference", "loraft"):
        out = out_root / f"{variant}.json"
        command = [sys.executable, __file__, "--worker", variant, "--shape", shape.name, "--prompts", str(args.prompts),
                   "--model-dir", str(model_dir), "--run-dir", str(run_dir), "--out", str(out)]
        with (out_root / f"{variant}.log").open("w") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            print(f"[bench] {variant} failed (exit {code}); see {out_root / (variant + '.log')}")
            return 1
        result = json.loads(out.read_text())
        result["single_tok_s"] = result["single"][0] / result["single"][1]
        result["batched_tok_s"] = result["batched"][0] / result["batched"][1]
        results[variant] = result
        print(f"[bench] {variant}: batch 1 {result['single_tok_s']:.2f} tok/s ({result['single'][0]} tokens), "
              f"batch {BATCH} {result['batched_tok_s']:.2f} tok/s, peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    ratio = results["loraft"]["single_tok_s"] / results["reference"]["single_tok_s"]
    batched_ratio = results["loraft"]["batched_tok_s"] / results["reference"]["batched_tok_s"]
    print(f"\n{shape.name}: loraft generate / reference pipeline, batch 1: {ratio:.2f}x; batch {BATCH}: {batched_ratio:.2f}x")
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": common.machine(),
              "shape": shape.name, "max_length": MAX_LENGTH, "results": results,
              "speedup_batch1": ratio, "speedup_batched": batched_ratio}
    common.write_json(out_root / "summary.json", report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
