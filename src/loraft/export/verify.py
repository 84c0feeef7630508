"""Prove a GGUF computes what the trained model computes, with llama.cpp itself (through xllamacpp's server).

Three checks against the merged model in transformers (fp32):
- first-token log-probabilities: for each prompt (rendered with the run's template, the same token ids on both
  sides), transformers' top-5 next tokens and their log-probabilities, looked up in llama.cpp's top-N. Compared
  as numbers, not as greedy text: a GGUF that lost its adapter can still pick the same greedy token.
- tokenization: a fixed set of strings (Chinese, English, code, digits, whitespace runs, special tokens) split
  into the same ids by llama.cpp's tokenizer as by transformers'.
- the chat prompt: the GGUF's own chat template (llama.cpp's `/apply-template`) renders the same text, and
  llama.cpp's tokens for it equal `apply_chat_template`'s.

xllamacpp binds its HTTP server to 127.0.0.1 on a free port; this module only talks to that loopback address.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from loraft.errors import RunError

TOP_K = 5  # transformers' top tokens whose log-probabilities are compared
LOOKUP_K = 50  # llama.cpp's top-N they are looked up in (a quantized file may reorder near-ties)

# Largest |log p(transformers) - log p(llama.cpp)| over the compared tokens, per weight type. Measured
# (docs/benchmarks.md, "GGUF export"; benchmarks/gguf_fidelity.py) on the trained demo BLOOM and a tiny Qwen2:
# f32 0.012 / 0.00001, f16 0.015 / 0.0001, bf16 0.064 / 0.001, q8_0 0.14 / 0.002, q4_k_m 0.40 / 0.002. Even f32 is
# not exact: llama.cpp's CPU kernels compute differently from PyTorch's, visibly more on the trained BLOOM than on
# a random Qwen2 (the cause was not isolated). Each bound is about 3x the largest measured, and stays far below
# what a missing or wrongly scaled adapter changes (the negative controls measured 0.5 to 11 nats).
TOLERANCES = {"f32": 0.05, "f16": 0.05, "bf16": 0.2, "q8_0": 0.5, "q4_k_m": 1.5}
# q8_0 on a real model: SmolLM2-135M-Instruct (30 layers) measured 0.52 to 0.63 for a merged export and for an adapter
# on a q8_0 file, past the 0.5 the tiny models set; 1.5 is about 3x the most measured, as for the others
TOLERANCES["q8_0"] = 1.5
# an adapter on the user's own GGUF (a run whose base is that file): llama.cpp computes with its quantized weights,
# transformers with the same weights dequantized exactly, so what differs is llama.cpp's kernels, which quantize the
# activations to 8 bits against quantized weights. Measured with a trained adapter on SmolLM2-135M-Instruct
# (benchmarks/gguf_base.py; docs/benchmarks.md, "A GGUF file as the base"): q4_1 (the original file) 0.67, q4_0
# 0.31, q5_0 0.37, q5_1 0.29 (q8_0 0.52, f16 0.019); the file alone, the negative control, 3.1 to 4.9 on the task's
# prompts but only 1.6 to 2.3 on the fixed probes. About 3x the measured, except q4_1: 3x (2.0) would equal its
# control on the fixed probes (2.04), so 1.5. Not measured (no llama-quantize): q5_k_m and q6_k as the 5-bit types,
# q4_k_s as q4_1.
TOLERANCES.update({"q4_0": 1.0, "q4_1": 1.5, "q5_0": 1.0, "q5_1": 1.0, "q5_k_m": 1.0, "q6_k": 1.0, "q4_k_s": 1.5})
TOLERANCE_REASONS = {
    "f32": "same weights; llama.cpp's kernels differ from PyTorch's",
    "f16": "weights rounded to f16 (11-bit mantissa)",
    "bf16": "weights rounded to bf16 (8-bit mantissa)",
    "q8_0": "8-bit blocks of 32 weights",
    "q4_k_m": "4/6-bit k-quant blocks",
    # an adapter on the user's own file: the same weights on both sides, llama.cpp's activations in 8 bits
    **{kind: f"the file's {kind} weights, llama.cpp's 8-bit activations against them"
       for kind in ("q4_0", "q4_1", "q5_0", "q5_1", "q5_k_m", "q6_k", "q4_k_s")},
}

PROBE_STRINGS = (
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "我想在apple工作1314151天～",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.",
    "def square(x):\n    return x ** 2  # 平方\n\nprint([square(i) for i in range(10)])\n",
    "3 33 333 3333 33333 1234567890 3.14159 -42 1e-5",
    "   leading spaces\t\ttabs\n\n\nnew lines   \n \n",
    "混合 mixed 文本 text，标点：“引号”（括号）……！？",
)

PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "你好，请用一句话介绍你自己。"}],
    [{"role": "user", "content": "把下面的句子翻译成英文：\n我喜欢猫。"}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    [{"role": "user", "content": "1+1 等于几？"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "再加 3 呢？"}],
    [{"role": "system", "content": "你是一个简洁的助手。"}, {"role": "user", "content": "列出三种颜色。"}],
)


@contextlib.contextmanager
def native_output_to(path: Path):
    """llama.cpp logs to the process's stderr from its own threads: send file descriptor 2 to a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class LlamaCpp:
    """A GGUF loaded by llama.cpp (xllamacpp.Server), with an optional LoRA adapter GGUF applied at scale 1."""

    def __init__(self, gguf_path: Path, lora_path: Optional[Path] = None, n_ctx: int = 1024,
                 threads: Optional[int] = None):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_path)
        params.n_ctx = n_ctx
        params.n_predict = 1
        params.n_parallel = 1
        params.warmup = False
        params.use_jinja = True
        if not threads:  # torch's share in this process (OMP_NUM_THREADS, else the cores): llama.cpp's threads spin
            import torch  # while they wait, so more stall on a busy machine (benchmarks/llama_threads.py)

            threads = max(1, min(torch.get_num_threads(), 8))
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        if lora_path is not None:
            adapter = xllamacpp.CommonAdapterLoraInfo()
            adapter.path, adapter.scale = str(lora_path), 1.0
            params.lora_adapters = [adapter]
        self.server = xllamacpp.Server(params)
        self.address = self.server.listening_address
        if not self.address.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise RunError(f"xllamacpp listens on {self.address}, not on loopback; not sending anything there")

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.address + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def apply_template(self, messages: Sequence[dict]) -> str:
        return self._post("/apply-template", {"messages": list(messages)})["prompt"]

    def next_token_logprobs(self, ids: Sequence[int], sampled: int, top: int = LOOKUP_K) -> dict[int, float]:
        """{token id: log-probability} of llama.cpp's `top` most likely next tokens after `ids`, from its raw logits.

        Args:
            sampled: a token that spells whole characters (`.`), made the one sampled by a logit bias: the server
                leaves out the probabilities of a sampled token that ends inside a UTF-8 character (a byte-level
                BPE's first byte of 你); the bias changes what is sampled, not the probabilities it reports.
        """
        answer = self._post("/completion", {"prompt": list(ids), "n_predict": 1, "n_probs": top, "temperature": 0,
                                            "cache_prompt": False, "post_sampling_probs": False,
                                            "logit_bias": [[sampled, 100.0]]})
        first = answer["completion_probabilities"][0]
        return {entry["id"]: entry["logprob"] for entry in first["top_logprobs"]}

    def complete(self, ids: Sequence[int], max_tokens: int) -> str:
        """llama.cpp's greedy continuation of `ids` (it stops at the model's end-of-generation tokens)."""
        answer = self._post("/completion", {"prompt": list(ids), "n_predict": max_tokens, "temperature": 0,
                                            "cache_prompt": False})
        return answer["content"]

    def close(self) -> None:
        self.server = None
        import gc

        gc.collect()


@dataclass
class Reference:
    """The merged model in transformers, its tokenizer (with the training template as chat_template)."""

    model: object
    tokenizer: object
    # top_logprobs by (ids, k): an adapter-only export's negative control asks again for the same prompts
    answered: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model_dir: Path) -> "Reference":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        return cls(model, AutoTokenizer.from_pretrained(str(model_dir)))

    def top_logprobs(self, ids: Sequence[int], k: int = TOP_K) -> list[tuple[int, float]]:
        import torch

        key = (tuple(ids), k)
        if key not in self.answered:
            with torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float()
            values, indices = torch.log_softmax(logits, dim=-1).topk(k)
            self.answered[key] = list(zip(indices.tolist(), values.tolist()))
        return self.answered[key]

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        return list(encoded["input_ids"])

    def chat_text(self, messages: Sequence[dict]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _width(text: str) -> int:
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _short(text: str, limit: int = 40) -> str:
    """`text` on one line, cut to `limit` terminal columns (CJK characters take two)."""
    text = text.replace("\n", "\\n")
    if _width(text) <= limit:
        return text
    while _width(text) > limit - 1:
        text = text[:-1]
    return text + "…"


def compare(reference: Reference, llama: LlamaCpp, conversations: Sequence[Sequence[dict]],
            strings: Sequence[str], tolerance: float) -> dict:
    """Run the three checks; returns the measured numbers and `passed`."""
    tokenizer = reference.tokenizer
    special = [t for t in (tokenizer.eos_token, tokenizer.bos_token) if t]
    strings = list(strings) + [f"{s} hello {s}" for s in dict.fromkeys(special)]
    mismatches = []
    for text in strings:
        ours, theirs = reference.ids(text), llama.tokenize(text)
        if ours != theirs:
            mismatches.append({"text": text, "transformers": ours, "llama_cpp": theirs})

    prompts, worst, absent = [], 0.0, 0
    for messages in conversations:
        text = reference.chat_text(messages)
        ids = reference.chat_ids(messages)
        gguf_text = llama.apply_template(messages)
        gguf_ids = llama.tokenize(gguf_text)
        expected = reference.top_logprobs(ids)
        found = llama.next_token_logprobs(ids, sampled=reference.ids(".")[-1])
        # a token outside llama.cpp's top-N has a log-probability at most the N-th one's: a lower bound
        floor = min(found.values()) if found else -math.inf
        differences = [abs(lp - found[i]) if i in found else max(lp - floor, 0.0) for i, lp in expected]
        missing = sum(i not in found for i, _ in expected)
        worst = max(worst, max(differences))
        absent += missing
        top_gguf = max(found, key=found.get) if found else None
        prompts.append({
            "prompt": _short(messages[-1]["content"]), "tokens": len(ids),
            "template_text_equal": gguf_text == text, "chat_tokens_equal": gguf_ids == ids,
            "llama_cpp_tokens": len(gguf_ids),
            "transformers_top5": [[i, round(lp, 5)] for i, lp in expected],
            "llama_cpp_logprobs": [round(found[i], 5) if i in found else None for i, _ in expected],
            "max_abs_diff": max(differences), "top1_equal": top_gguf == expected[0][0],
            "outside_llama_cpp_top": missing,
        })
    passed = (worst <= tolerance and not absent and not mismatches and all(p["template_text_equal"] for p in prompts)
              and all(p["chat_tokens_equal"] for p in prompts))
    return {
        "tolerance": tolerance, "logprob_max_abs_diff": worst,
        "top1_equal": sum(p["top1_equal"] for p in prompts), "outside_llama_cpp_top": absent, "prompts": prompts,
        "tokenization": {"strings": len(strings), "equal": len(strings) - len(mismatches), "mismatches": mismatches},
        "passed": passed,
    }


def verify_gguf(gguf_path: Path, reference_dir: Path, outtype: str, log_path: Path, lora_path: Optional[Path] = None,
                conversations: Sequence[Sequence[dict]] = PROBE_CONVERSATIONS, strings: Sequence[str] = PROBE_STRINGS,
                tolerance: Optional[float] = None, reference: Optional[Reference] = None) -> dict:
    """Load `gguf_path` (and `lora_path`) in llama.cpp and compare it with the model in `reference_dir`."""
    tolerance = TOLERANCES.get(outtype, 1.5) if tolerance is None else tolerance  # an unmeasured type: a 4-bit's
    reference = reference or Reference.load(reference_dir)
    with native_output_to(log_path):
        llama = LlamaCpp(gguf_path, lora_path)
        try:
            result = compare(reference, llama, conversations, strings, tolerance)
        finally:
            llama.close()
    result["tolerance_reason"] = TOLERANCE_REASONS.get(outtype, "given" if outtype in TOLERANCES else
                                                      "a weight type not measured: a 4-bit type's")
    return result


def format_report(result: dict) -> list[str]:
    """A short table of the verification: one line per prompt, then the verdicts."""
    lines = [f"  {'prompt':<42}{'tokens':>7}{'max |Δ logp|':>14}{'top-1':>7}"]
    for prompt in result["prompts"]:
        pad = " " * (42 - _width(prompt["prompt"]))
        lines.append(f"  {prompt['prompt']}{pad}{prompt['tokens']:>7}{prompt['max_abs_diff']:>14.5f}"
                     f"{'same' if prompt['top1_equal'] else 'DIFF':>7}")
    tokenization = result["tokenization"]
    outside = result.get("outside_llama_cpp_top")
    outside = f"; {outside} compared tokens outside llama.cpp's top {LOOKUP_K}" if outside else ""
    chat = all(p["template_text_equal"] and p["chat_tokens_equal"] for p in result["prompts"])
    lines.append(f"  log-prob difference {result['logprob_max_abs_diff']:.5f} (tolerance {result['tolerance']}: "
                 f"{result.get('tolerance_reason', '')}{outside}); tokenization {tokenization['equal']}/"
                 f"{tokenization['strings']} strings equal; chat template and prompt tokens "
                 f"{'equal' if chat else 'DIFFER'}")
    return lines
