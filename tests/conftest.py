"""Shared fixtures: tiny random models (BLOOM and Llama-style) with a tokenizer that covers Chinese, the alpaca
records (`write_alpaca`, `alpaca_jsonl`), and one environment for the whole session that makes no outcome depend on
the CPU or on caches outside it (`machine_independent_environment`).

Everything is built offline once per test session and saved to disk, so every test loads it through
the same `from_pretrained(dir)` path as a hub model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# What outlives a test session (llama.cpp's converter tree, the real model, tokenizers rebuilt from it, the Go
# renderer): $LORAFT_TEST_CACHE, else ~/.cache/loraft-test. Filled under locked_test_cache().
TEST_CACHE = Path(os.environ.get("LORAFT_TEST_CACHE") or Path.home() / ".cache" / "loraft-test")


@contextlib.contextmanager
def locked_test_cache():
    """Hold the test cache's lock: one process at a time checks and fills TEST_CACHE (xdist workers share it)."""
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    with open(TEST_CACHE / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield TEST_CACHE
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The suite runs in pytest-xdist workers (pyproject's addopts: -n auto --dist loadfile), each a whole test file at a
# time. A worker gets its share of the CPUs for torch and for every process it starts (set before torch is
# imported): two workers of two threads each on two cores run slower than one worker alone.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

MAX_WORKERS = 4  # each worker builds the session's tiny models and shared runs again, and holds ~1-2 GB


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker a CPU this process may use (not psutil's physical cores), at most MAX_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


# Test files whose tests take longest, longest first: they are collected first, so pytest-xdist (--dist loadfile
# --no-loadscope-reorder) hands them out first and no long file starts last. A file missing here only runs later.
SLOWEST_FILES = ("test_real_model.py", "test_ui_confinement.py", "test_gguf.py", "test_ui_e2e.py", "test_ui_fuzz.py",
                 "test_preference_train.py", "test_lifecycle.py", "test_ui_api.py",
                 "test_distributed.py", "test_train.py", "test_install.py")


def pytest_collection_modifyitems(config, items):
    """The slowest files first (SLOWEST_FILES); tests marked `slow` run only with LORAFT_SLOW=1 or a -m expression
    that names slow."""
    rank = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays
    if os.environ.get("LORAFT_SLOW") == "1" or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with LORAFT_SLOW=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def machine_independent_environment(tmp_path_factory):
    """The same loraft environment for every test and every process a test starts, whatever the CPU.

    - LORAFT_HOME: a session directory, so every cache (tokenized data, the precision probe, speed measurements,
      the demo base) starts empty and no run reads what another machine or an earlier session left in
      ~/.cache/loraft. LORAFT_CACHE_DIR (the documented override, which would win over it) is removed.
    - LORAFT_CPU_BF16=emulated unless set: `train.precision: auto` is fp32 on every CPU, without a probe.
      `LORAFT_CPU_BF16=fast python -m pytest` runs the whole suite on the other branch (bf16); tests that
      check the decision itself set each value on purpose.
    - LORAFT_AUTOTUNE=0 unless set: the plan's static defaults, so no test times this machine.

    Set in os.environ (subprocesses inherit it) at session start and restored at the end.
    """
    wanted = {"LORAFT_HOME": str(tmp_path_factory.mktemp("loraft-home")), "LORAFT_CACHE_DIR": None,
              "LORAFT_CPU_BF16": os.environ.get("LORAFT_CPU_BF16") or "emulated",
              "LORAFT_AUTOTUNE": os.environ.get("LORAFT_AUTOTUNE") or "0"}
    saved = {name: os.environ.get(name) for name in wanted}
    for name, value in wanted.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    yield Path(wanted["LORAFT_HOME"])
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


CORPUS = [
    "人工智能是什么", "人工智能是计算机科学的一个分支。", "请把下面的句子翻译成英文", "今天天气很好",
    "写一首关于春天的诗", "春眠不觉晓，处处闻啼鸟。", "Human: 你好\n\nAssistant: 你好！有什么可以帮你？",
    "The quick brown fox jumps over the lazy dog.", "1 2 3 4 5 6 7 8 9 0", "北京是中国的首都。",
    "请计算 12 加 30 等于多少", "答案是 42。", "把字母变成大写：abc", "ABC", "你是一个有帮助的助手。",
]


def _train_tokenizer(add_bos: bool):
    from loraft.demo import build_tokenizer

    return build_tokenizer(CORPUS * 3, vocab_size=400, add_bos=add_bos)


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory) -> Path:
    """A 12-layer, 32-wide random BLOOM (tied embeddings) saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig

    path = tmp_path_factory.mktemp("tiny-bloom")
    tokenizer = _train_tokenizer(add_bos=False)
    config = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=32, n_layer=12, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama-style model (untied, BOS-adding tokenizer) saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _train_tokenizer(add_bos=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path



# Chat templates written here, in the style of the families' own (tests must not depend on a hub download).
# Qwen2-instruct style: ChatML, a default system prompt, <|im_end|> ends a turn and is the EOS.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# Llama-3-instruct style: BOS, header tokens, <|eot_id|> ends every turn; pad == eos as in many Llama setups.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)


def save_random_model(path: Path, tokenizer, config) -> Path:
    """A random model of `config` (seed 0) saved with `tokenizer` under `path`, as a hub model would be."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama3_tokenizer():
    """The test tokenizer with Llama-3-style special tokens and template; pad == eos == <|eot_id|>."""
    return _chat_tokenizer(True, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3_TEMPLATE,
                           eos="<|eot_id|>", pad="<|eot_id|>")


def _chat_tokenizer(add_bos: bool, specials: list[str], template: str, eos: str, pad: str):
    tokenizer = _train_tokenizer(add_bos=add_bos)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = eos
    tokenizer.pad_token = pad
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 (tied embeddings) whose tokenizer carries a ChatML template (eos <|im_end|>)."""
    from transformers import Qwen2Config

    tokenizer = _chat_tokenizer(False, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], CHATML_TEMPLATE,
                                eos="<|im_end|>", pad="<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return save_random_model(tmp_path_factory.mktemp("tiny-qwen2"), tokenizer, config)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama whose tokenizer carries a Llama-3-style template, with pad == eos == <|eot_id|>."""
    from transformers import LlamaConfig

    tokenizer = llama3_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return save_random_model(tmp_path_factory.mktemp("tiny-llama3"), tokenizer, config)


# A tiny run of the tiny models (a workspace's `base/` and `data/train.jsonl`), as the UI tests start it.
TINY_RUN_YAML = """\
model:
  name_or_path: base
data:
  path: data/train.jsonl
  max_length: 64
train:
  max_steps: 3
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1
  learning_rate: 0.01
  logging_steps: 1
  save_steps: 2
  precision: fp32
generation:
  dtype: fp32
  max_new_tokens: 4
"""


ALPACA_RECORDS = [
    {"instruction": "人工智能是什么", "input": "", "output": "人工智能是计算机科学的一个分支。"},
    {"instruction": "请把下面的句子翻译成英文", "input": "今天天气很好", "output": "The weather is nice today."},
    {"instruction": "写一首关于春天的诗", "input": "", "output": "春眠不觉晓，处处闻啼鸟。"},
    {"instruction": "请计算 12 加 30 等于多少", "input": "", "output": "答案是 42。"},
    {"instruction": "把字母变成大写：abc", "input": "", "output": "ABC"},
    {"instruction": "北京是哪个国家的首都？", "input": " ", "output": "北京是中国的首都。"},
    {"instruction": "  介绍你自己 ", "input": "简短一点\n", "output": "你好！我是一个有帮助的助手。"},
    {"instruction": "重复：1 2 3", "input": "", "output": "1 2 3"},
]


def write_alpaca(path: Path, records: list[dict] | None = None, repeat: int = 1) -> Path:
    """`records` (default ALPACA_RECORDS) repeated `repeat` times, one JSON object a line (UTF-8), at `path`.

    Every test that needs alpaca records on disk writes them here; returns `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(ALPACA_RECORDS if records is None else records) * repeat
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# The run test_lifecycle, test_crash_safety and test_ui_e2e stop, kill and resume, and the uninterrupted reference
# each of them compares its adapter with, bit for bit (fp32, samples drawn from the seed): a tiny BLOOM on
# ALPACA_RECORDS x 4, 2 x 2 samples a step, so 8 steps an epoch; a checkpoint every REFERENCE_SAVE_STEPS, all kept.
REFERENCE_STEPS, REFERENCE_SAVE_STEPS = 32, 4


def reference_yaml(model, data, output_dir=None, max_steps: int = REFERENCE_STEPS,
                   save_steps: int = REFERENCE_SAVE_STEPS) -> str:
    """The reference run's config file (`output_dir` left out: given on the command line or by the UI)."""
    lines = ([f"output_dir: {output_dir}"] if output_dir else []) + [
        "model:", f"  name_or_path: {model}", "data:", f"  path: {data}", "train:", f"  max_steps: {max_steps}",
        f"  save_steps: {save_steps}", "  save_total_limit: null", "  logging_steps: 1",
        "  per_device_train_batch_size: 2", "  gradient_accumulation_steps: 2", "  learning_rate: 0.01",
        "  precision: fp32", "  sampling: random",
        "adapter:", "  dropout: 0.1"]  # LoRA dropout on: a resume must restore its masks too (fastpaths.dropout)
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def one_thread():
    """torch on one thread meanwhile: an in-process run computes as the OMP_NUM_THREADS=1 processes it is compared
    with bit for bit do."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_bloom_dir) -> Path:
    """The uninterrupted reference run (reference_yaml), trained once a session (each xdist worker) in this process on
    one thread, with every checkpoint kept. Read it, never write into it (copy it with shutil.copytree to change it)."""
    from loraft.config import load_config
    from loraft.train import train

    root = tmp_path_factory.mktemp("reference")
    config = root / "reference.yaml"
    config.write_text(reference_yaml(tiny_bloom_dir, write_alpaca(root / "alpaca.jsonl", repeat=4), root / "run"),
                      encoding="utf-8")
    with one_thread():
        return Path(train(load_config(config)))


@pytest.fixture()
def alpaca_jsonl(tmp_path) -> Path:
    """A small alpaca-format JSONL file (Chinese): ALPACA_RECORDS once."""
    return write_alpaca(tmp_path / "alpaca.jsonl")


@pytest.fixture()
def alpaca_disk_dir(tmp_path) -> Path:
    """The same records as a `Dataset.save_to_disk` directory, like the reference's alpaca_data_zh."""
    from datasets import Dataset

    path = tmp_path / "alpaca_data_zh"
    Dataset.from_list(ALPACA_RECORDS * 4).save_to_disk(str(path))
    return path
