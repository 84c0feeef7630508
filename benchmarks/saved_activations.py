"""What one loraft SFT step keeps for its backward pass, by module kind and dtype (issue 27's memory goal).

    python benchmarks/saved_activations.py                         # SmolLM2, one step of 16 of sft_speed's records
    python benchmarks/saved_activations.py adapter.lora_dropout=0  # any `loraft train` overrides after it

Trains one optimizer step of the `gguf-lora` preset on SmolLM2-135M-Instruct (its Q4_1 GGUF, loraft.smollm2) with
`train.retention=off`, on records like benchmarks/sft_speed.py's (the same generator and seed), and counts every
tensor autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks), each storage once, under the
innermost module running when it was saved ("(outside a module)": the attention's matmuls and softmax, residual adds
and the loss, which run as functions). Prints MiB per (module kind, dtype) and the total, and writes them as JSON
with --json. This counts what is kept, not the peak: transient buffers (logit chunks, gradients being formed) and the
allocator's slack come on top, so the process's peak RSS grows by more than the total.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="loraft train overrides (key=value)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()

    from transformers import TrainerCallback

    from loraft.config import load_config
    from loraft.presets import preset_path
    from loraft.smollm2 import smollm2_gguf
    from loraft.train import train
    from sft_speed import make_records

    saved: collections.Counter = collections.Counter()
    seen: set = set()
    stack = ["(outside a module)"]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            saved[(stack[-1], str(tensor.dtype).replace("torch.", ""))] += tensor.untyped_storage().nbytes()
        return tensor

    class Count(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def enter(module, inputs):
                stack.append(type(module).__name__)

            def leave(module, inputs, output):
                stack.pop()

            for module in model.modules():
                if not list(module.children()) or type(module).__name__ == "Linear":  # peft's LoRA layer too
                    module.register_forward_pre_hook(enter)
                    module.register_forward_hook(leave)
            self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
            self.hooks.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.hooks.__exit__(None, None, None)
            control.should_training_stop = True

    root = Path(tempfile.mkdtemp(prefix="loraft-saved-"))
    records = make_records(args.samples, 0)
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = load_config(preset_path("gguf-lora"), [
        f"model.name_or_path={smollm2_gguf()}", f"data.path={root / 'records.jsonl'}", f"output_dir={root / 'run'}",
        "train.max_steps=1", "train.save_steps=100000", "train.retention=off",
        f"train.per_device_train_batch_size={args.samples // 2}", "train.gradient_accumulation_steps=2",
        *args.overrides])
    train(config, callbacks=[Count()], progress_bar=False)
    shutil.rmtree(root, ignore_errors=True)
    rows = [{"module": module, "dtype": dtype, "mib": round(size / 2**20, 1)}
            for (module, dtype), size in saved.most_common()]
    total = sum(saved.values()) / 2**30
    for row in rows:
        print(f"{row['module']:28} {row['dtype']:10} {row['mib']:9.1f} MiB")
    print(f"total {total:.2f} GiB kept for the backward over the step ({args.samples} samples)")
    if args.json:
        common.write_json(Path(args.json), {"machine": common.machine(), "overrides": args.overrides,
                                            "samples": args.samples, "rows": rows, "total_gib": round(total, 3)})


if __name__ == "__main__":
    main()
