"""Where a loraft SFT step's time goes on SmolLM2, with the library's default attention and with eager (issue 27).

    python benchmarks/profile_attention.py                                  # the plan's attention
    python benchmarks/profile_attention.py model.attn_implementation=eager  # eager
    python benchmarks/profile_attention.py model.attn_implementation=sdpa   # the library's default

Trains 5 steps of sft_speed.py's SmolLM2 setup (16 samples a step, `train.retention=off`) from the records of an
earlier `sft_speed.py` run (--run-root, default the newest under ~/.cache/loraft-bench/runs) and prints torch.profiler's
operator table for step 4, with its total CPU time. docs/benchmarks.md quotes its output ("With the attention the
autotune measures": sdpa's CPU flash-attention backward, and the step's total with each attention).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_speed  # noqa: E402


def main(argv: list[str]) -> int:
    from torch.profiler import profile
    from transformers import TrainerCallback

    from loraft.train import train

    runs = sorted((Path.home() / ".cache" / "loraft-bench" / "runs").glob("sft-smollm2-*"))
    root = Path(argv[argv.index("--run-root") + 1]) if "--run-root" in argv else (runs[-1] if runs else None)
    if root is None or not (root / "records.jsonl").is_file():
        raise SystemExit("no sft_speed.py run to take the records from: run benchmarks/sft_speed.py --quick first")
    overrides = [a for a in argv if "=" in a]
    args = SimpleNamespace(model="smollm2", batch=16, accumulation=1, gguf=str(sft_speed.gguf_path()), run_root=root)
    config = sft_speed.loraft_config(args, Path("/tmp/loraft-profile-attention"),
                                     ["train.retention=off", "train.max_steps=5", *overrides])

    class Profile(TrainerCallback):
        running = None

        def on_step_begin(self, arguments, state, control, **kwargs):
            if state.global_step == 3:
                self.running = profile()
                self.running.__enter__()

        def on_step_end(self, arguments, state, control, **kwargs):
            if self.running is not None and state.global_step == 4:
                self.running.__exit__(None, None, None)
                print(self.running.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
                self.running = None

    train(config, callbacks=[Profile()], progress_bar=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
