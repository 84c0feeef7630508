"""Shared pieces of the benchmarks: model shapes with random weights, token-id samples, GEMM peak, memory.

No tokenizer of the real models is available offline, so the benchmarks work on token ids: every variant
gets exactly the same ids, masks and labels, built by the reference recipe's own preprocessing rule
(prompt labels -100, response + EOS supervised, truncated to 256 tokens).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

CACHE = Path(os.environ.get("LORAFT_BENCH_CACHE", Path.home() / ".cache" / "loraft-bench"))


@dataclass(frozen=True)
class Shape:
    """A model shape: the architecture's config with random weights, and the reference adapter for it."""

    name: str
    family: str  # bloom or llama
    hidden: int
    layers: int
    heads: int
    vocab: int
    kv_heads: Optional[int] = None
    intermediate: Optional[int] = None
    target_modules: str = r".*\.1.*query_key_value"
    modules_to_save: tuple = ("word_embeddings",)
    note: str = ""
    extra: dict = field(default_factory=dict)


SHAPES = {
    "bloom-1b4-zh": Shape(
        "bloom-1b4-zh", "bloom", hidden=2048, layers=24, heads=16, vocab=46145,
        note="Langboat/bloom-1b4-zh's shape: 1,303,111,680 parameters, random weights",
    ),
    "bloom-small": Shape(
        "bloom-small", "bloom", hidden=512, layers=8, heads=8, vocab=46145,
        note="a small BLOOM for quick runs (the real vocabulary, 8 layers of width 512)",
    ),
    "llama-large-vocab": Shape(
        "llama-large-vocab", "llama", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
        target_modules=r".*\.1.*\.(q_proj|k_proj|v_proj)", modules_to_save=("embed_tokens",),
        note="Qwen2-0.5B-like Llama shape (untied, vocab 151936); LoRA on q/k/v of layers 1 and 10-19",
    ),
}

PAD_ID, EOS_ID = 3, 2  # the benchmark tokenizer's ids (see build_tokenizer)


def build_tokenizer():
    """A tiny tokenizer with the special tokens the trainers need (pad, eos); samples are token ids anyway."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"t{i}": i for i in range(4, 64)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=4096,
    )


def model_config(shape: Shape):
    from transformers import BloomConfig, LlamaConfig

    common = dict(vocab_size=shape.vocab, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if shape.family == "bloom":
        return BloomConfig(hidden_size=shape.hidden, n_layer=shape.layers, n_head=shape.heads, **common)
    return LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, max_position_embeddings=4096,
        tie_word_embeddings=False, **common,
    )


def ensure_model_dir(shape: Shape) -> Path:
    """Random-weight model of `shape` saved (fp32 safetensors) with the benchmark tokenizer; built once."""
    import torch
    from transformers import AutoModelForCausalLM

    path = CACHE / "models" / shape.name
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.float32)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def parameter_counts(shape: Shape) -> dict:
    """Matmul parameters per token of the body and the output head (what model FLOPs are counted from)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    body = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    head = model.get_output_embeddings().weight.numel()
    return {"total": total, "body_matmul": body, "head_matmul": head}


def draw_prompt_length(rng) -> int:
    """An alpaca-zh-like prompt length with its template: log-normal, median 30 tokens, within 10-150."""
    return int(np.clip(round(rng.lognormal(math.log(30), 0.7)), 10, 150))


def draw_response_length(rng) -> int:
    """An alpaca-zh-like response length with its EOS: log-normal, median 60 tokens, within 5-250."""
    return int(np.clip(round(rng.lognormal(math.log(60), 0.9)), 5, 250))


def make_samples(count: int, shape: Shape, seed: int = 0, max_length: int = 256) -> list[dict]:
    """alpaca-zh-like token-id samples, processed exactly like the reference's `preprocess_function`.

    Prompt ("Human: instruction\\ninput\\n\\nAssistant: ") 10-150 tokens, response 5-250 tokens ending in EOS
    (log-normal, medians 30 and 60); prompt labels -100; truncated to max_length, so some lose their end.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        prompt_length = draw_prompt_length(rng)
        response_length = draw_response_length(rng)
        prompt = rng.integers(10, shape.vocab, prompt_length).tolist()
        response = rng.integers(10, shape.vocab, response_length - 1).tolist() + [EOS_ID]
        input_ids = (prompt + response)[:max_length]
        labels = ([-100] * len(prompt) + response)[:max_length]
        samples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return samples


def describe_samples(samples: list[dict]) -> dict:
    lengths = np.array([len(s["input_ids"]) for s in samples])
    supervised = np.array([sum(1 for label in s["labels"] if label != -100) for s in samples])
    return {
        "samples": len(samples),
        "tokens_mean": float(lengths.mean()), "tokens_max": int(lengths.max()),
        "supervised_mean": float(supervised.mean()),
        "truncated": int((lengths == 256).sum()),
    }


# Kernel caps that make this CPU compute like a smaller one (oneDNN, ATen and MKL all honour them): how the
# fp32-only class (an AVX2 CPU, where bf16 is emulated) is measured on a machine that has more.
CPU_ISA_CAPS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


def reexec_with_isa(isa: str) -> None:
    """Restart this script with the kernel caps of `isa` in its environment (a no-op for native or when set)."""
    caps = CPU_ISA_CAPS.get(isa, {})
    if caps and any(os.environ.get(name) != value for name, value in caps.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **caps})


def gemm_peak(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-N GFLOPS of a size^3 matmul in fp32 or bf16 on the device loraft trains on (GPU or CPU), right now."""
    import torch

    from loraft.precision import resolve_device

    device = resolve_device("auto")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    for attempt in range(repeats + 2):  # the first two are warm-up
        synchronize()
        start = time.perf_counter()
        a @ b
        synchronize()
        seconds = time.perf_counter() - start
        if attempt >= 2 or seconds > 1.0:  # a second per matmul: emulated bf16, and one reading says so
            best = min(best, seconds)
        if seconds > 1.0:
            break
    return 2 * size**3 / best / 1e9


def model_flops(counts: dict, tokens: int, supervised: int, attention_flops: float) -> float:
    """Useful FLOPs of LoRA training on frozen weights: forward + input-gradient backward (2 x 2 x params)
    per token through the body, the head only where a label is supervised, plus attention scores."""
    return 4 * counts["body_matmul"] * tokens + 4 * counts["head_matmul"] * supervised + attention_flops


def attention_flops(shape: Shape, lengths: list[int]) -> float:
    """Causal attention (QK^T and PV, forward + backward) for samples of these lengths."""
    return sum(2 * 2 * 3 * shape.layers * shape.hidden * n * (n + 1) / 2 for n in lengths)


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        isa = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags.split()]
    except (OSError, StopIteration):
        isa = []
    from loraft.precision import KERNEL_ENV, cpu_probe, hardware_class, resolve_precision

    probe = cpu_probe() if not torch.cuda.is_available() else {}
    return {
        # the class loraft's precision policy sees (flags + its cached matmul probe), and what `auto` resolves to
        "hardware_class": hardware_class(), "auto_precision": resolve_precision("auto"),
        "probe_bf16_speedup": probe.get("bf16_speedup"),
        "kernel_env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
        "cpu": cpu, "cores": os.cpu_count(), "isa": isa, "threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
    }


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------ pieces of a timed training run (train_speed, dpo_speed, sft_speed)

RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bloom-1b4-zh-lora.yaml"
SUPERVISED_COUNTS = ("samples", "tokens", "supervised", "padded")


def count_supervised(batch) -> dict:
    """What a collated SFT batch holds: samples, non-padding tokens, supervised targets, padded positions."""
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    return {
        "samples": labels.shape[0], "padded": labels.numel(),
        "tokens": int(mask.sum()) if mask is not None else labels.numel(),
        # a causal LM predicts label t from position t-1: the first label of a row is never a target
        "supervised": int((labels[:, 1:] != -100).sum()),
    }


class StepClock:
    """Counts what each collated batch holds (`count`: batch -> {key: number}, summed per step over `keys`), and
    timestamps every optimizer step and logged loss; `callback` is the TrainerCallback to pass the trainer."""

    def __init__(self, count=count_supervised, keys=SUPERVISED_COUNTS):
        from transformers import TrainerCallback

        clock = self
        self.count, self.keys = count, keys
        # collated batches not yet attributed to a step: accelerate's loader collates one batch ahead
        self.queue: list[dict] = []
        self.steps: list[dict] = []
        self.losses: list[dict] = []
        self.start = None

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
                clock.start = time.perf_counter()
                # accelerate's DataLoaderShard may wrap the torch DataLoader that does the collating
                loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
                loader.collate_fn = clock.wrap(loader.collate_fn)

            def on_step_end(self, args, state, control, **kwargs):
                last = state.global_step >= state.max_steps
                taken = clock.queue if last else clock.queue[: args.gradient_accumulation_steps]
                clock.queue = [] if last else clock.queue[args.gradient_accumulation_steps :]
                counts = {key: sum(batch[key] for batch in taken) for key in clock.keys}
                clock.steps.append({"step": state.global_step, "time": time.perf_counter() - clock.start,
                                    "cpu_time": time.process_time(), **counts})

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.losses.append({"step": state.global_step, "loss": logs["loss"]})

        self.callback = Callback()

    def wrap(self, collate):
        def counted(features):
            batch = collate(features)
            self.queue.append(self.count(batch))
            return batch

        return counted


def peft_config(shape: Shape):
    """The reference recipe's LoraConfig for `shape` (peft's defaults r=8, alpha=8, dropout 0, as the recipe)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=shape.target_modules,
                      modules_to_save=list(shape.modules_to_save))


def sft_trainer(model, train_dataset, tokenizer, peft_config, callbacks, out_dir: Path, **settings):
    """TRL's SFTTrainer as its documentation shows it: the model by its folder, an SFTConfig of TRL's defaults with
    `settings` over them, the LoRA through peft_config; one epoch, logging every step, no checkpoints, no reporting
    (train_speed, sft_speed)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out_dir), num_train_epochs=1, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=not torch.cuda.is_available(), **settings)
    return SFTTrainer(model=str(model), args=args, train_dataset=train_dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)


def recipe_config(shape: Shape, model_dir: Path, out_dir: Path, overrides=()):
    """The recipe's loraft config (configs/bloom-1b4-zh-lora.yaml) on the benchmark model with `shape`'s adapter
    targets, logging every step and no checkpoint within the run, then `overrides`."""
    from loraft.config import load_config

    return load_config(RECIPE_CONFIG, [
        f"model.name_or_path={model_dir}", f"output_dir={out_dir}", "overwrite=true",
        f"adapter.target_modules={shape.target_modules}",
        f"adapter.modules_to_save=[{','.join(shape.modules_to_save)}]",
        "train.logging_steps=1", "train.save_steps=100000", *overrides,
    ])


def measured_run(run, dtypes=("fp32", "bf16")) -> dict:
    """Call `run()` between two readings of the GEMM peaks in `dtypes` and of the load average (how much of a shared
    machine it got); returns its wall time, peak RSS (and GPU memory) and those readings. An emulated bf16 reading
    takes about a minute on a CPU without bf16 instructions: leave bf16 out where nothing runs in it."""
    import torch

    load_before = load_average()
    peaks_before = {dtype: gemm_peak(dtype, repeats=3) for dtype in dtypes}
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    peaks_after = {dtype: gemm_peak(dtype, repeats=3) for dtype in dtypes}
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result = {"wall_s": wall, "peak_rss_gib": peak_rss_gib(), "peak_gpu_gib": peak_gpu,
              "load_average": [load_before, load_average()]}
    if "bf16" in dtypes:
        result["gemm_bf16_gflops"] = [peaks_before["bf16"], peaks_after["bf16"]]
    result["gemm_peaks"] = {dtype: (peaks_before[dtype] + peaks_after[dtype]) / 2 for dtype in dtypes}
    if "fp32" in dtypes:
        result["gemm_fp32_gflops"] = [peaks_before["fp32"], peaks_after["fp32"]]
    return result


def command_line(script: str) -> str:
    """How this benchmark was invoked, with the script's path relative to the working directory where it can be."""
    path = Path(script)
    shown = path.relative_to(Path.cwd()).as_posix() if path.is_relative_to(Path.cwd()) else script
    return "python " + " ".join([shown] + sys.argv[1:])
