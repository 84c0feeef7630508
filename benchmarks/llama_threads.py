"""llama.cpp's threads in loraft's GGUF verification (loraft.export.verify.LlamaCpp) on a busy machine and an idle one.

    python benchmarks/llama_threads.py [--repeats 3] [--json PATH]

SmolLM2-135M-Instruct's Q4_1 file (loraft.smollm2) loaded in llama.cpp (xllamacpp) with 1 thread and with 2, in
turn: a chat prompt tokenized, 4 next-token log-probability requests (what the verification asks) and a greedy
48-token completion (what the demo shows), timed after the load. First with one core kept busy by a spinning
process (what the test suite's second worker does), then without it. llama.cpp's threads spin while they wait, so
more threads than the process's share of the CPUs lose time on a busy machine; LlamaCpp therefore takes torch's
thread count (OMP_NUM_THREADS, else the cores) unless it is given one.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT = "<|im_start|>user\nWrite a story about a cat.<|im_end|>\n<|im_start|>assistant\n"


def timed_work(gguf: Path, threads: int, log: Path) -> float:
    from loraft.export.verify import LlamaCpp, native_output_to

    with native_output_to(log):
        llama = LlamaCpp(gguf, None, threads=threads)
        try:
            ids = llama.tokenize(PROMPT)
            started = time.perf_counter()
            for _ in range(4):
                llama.next_token_logprobs(ids, ids[-1])
            llama.complete(ids, 48)
            return time.perf_counter() - started
        finally:
            llama.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    from loraft.smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    log = Path(tempfile.mkdtemp()) / "llama.log"
    seconds: dict[str, dict[str, list[float]]] = {}
    for machine_state in ("one core busy", "idle"):
        spinner = (subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   if machine_state == "one core busy" else None)
        try:
            runs = seconds[machine_state] = {"1 thread": [], "2 threads": []}
            for _ in range(args.repeats):
                for threads in (2, 1):
                    runs[f"{threads} thread{'s' if threads > 1 else ''}"].append(
                        round(timed_work(gguf, threads, log), 3))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    medians = {state: {name: statistics.median(values) for name, values in runs.items()}
               for state, runs in seconds.items()}
    for state, values in medians.items():
        print(f"{state:14} " + "  ".join(f"{name}: {value:.2f} s" for name, value in values.items()))
    if args.json:
        common.write_json(Path(args.json), {"machine": common.machine(), "command": common.command_line(__file__),
                                            "file": str(gguf), "seconds": seconds, "median_seconds": medians})


if __name__ == "__main__":
    main()
