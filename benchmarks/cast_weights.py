"""The cast of the frozen weights to the compute dtype (loraft.weights.cast_frozen_weights), against the way it found
a storage's other users before (2026-12-06): a walk over every parameter and buffer of the model for each cast.

    python benchmarks/cast_weights.py [--repeats 5] [--json PATH]

SmolLM2-135M-Instruct (its Q4_1 GGUF, loraft.smollm2), dequantized once to fp32 safetensors (loraft.gguf_base), loaded
with from_pretrained (the file mapped, as a run loads it) and frozen; each repeat loads it again and times one cast of
its linear weights to bf16, the former way and the current one in turn. Prints the seconds and writes JSON with --json.
Both release the same checkpoint pages (tests/test_weights.py checks the current one does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def cast_before(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """The former cast_frozen_weights: for every cast, every parameter and buffer of the model asked whether it
    shares the replaced storage, and /proc/self/maps read again."""
    import ctypes
    import mmap

    from loraft.weights import frozen_linear_weights

    chosen = frozen_linear_weights(model, dtype)
    for parameter in chosen:
        original = parameter.data.untyped_storage()
        parameter.data = parameter.data.to(dtype)
        start, size = original.data_ptr(), original.nbytes()
        if any(t.untyped_storage().data_ptr() == start for t in list(model.parameters()) + list(model.buffers())):
            continue
        with open("/proc/self/maps", encoding="utf-8") as maps:
            mapped = any(fields[5].endswith(".safetensors") and int(low, 16) <= start
                         and start + size <= int(high, 16)
                         for fields in (line.split() for line in maps) if len(fields) >= 6
                         for low, high in [fields[0].split("-")])
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if mapped and last > first:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from loraft.gguf_base import hf_folder
    from loraft.smollm2 import smollm2_gguf
    from loraft.weights import cast_frozen_weights

    folder = hf_folder(str(smollm2_gguf()), weights="fp32")
    seconds: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(args.repeats):
        for name, cast in (("before", cast_before), ("now", cast_frozen_weights)):
            model = AutoModelForCausalLM.from_pretrained(str(folder), variant="fp32", dtype=torch.float32)
            model.requires_grad_(False)
            started = time.perf_counter()
            count = cast(model, torch.bfloat16)
            seconds[name].append(round(time.perf_counter() - started, 4))
            del model
    report = {"machine": common.machine(), "command": common.command_line(__file__), "weights_cast": count,
              "seconds": seconds}
    for name, values in seconds.items():
        print(f"{name:7} {min(values):.3f}-{max(values):.3f} s  (median {sorted(values)[len(values) // 2]:.3f})")
    if args.json:
        common.write_json(Path(args.json), report)


if __name__ == "__main__":
    main()
