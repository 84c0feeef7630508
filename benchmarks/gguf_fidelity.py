"""How far each GGUF weight type moves a run's first-token log-probabilities from transformers', in one run.

    python benchmarks/gguf_fidelity.py RUN_DIR [RUN_DIR ...] [--outtype f32 --outtype q8_0 ...] [--llama-cpp DIR]

For every run and weight type, `loraft export --format gguf` writes and verifies the file (llama.cpp through
xllamacpp against the merged model in transformers, fp32); this prints the largest |Δ log p| over the compared
tokens, top-1 agreement, tokenization, file size and export time, plus the adapter-only negative control (the
base GGUF alone against the fine-tuned model). These are the numbers behind loraft.export.verify.TOLERANCES.
q4_k_m is measured when llama.cpp's llama-quantize is found ($LLAMA_QUANTIZE, PATH or --llama-cpp DIR).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--outtype", action="append", help="default: f32 f16 bf16 q8_0, and q4_k_m if possible")
    parser.add_argument("--llama-cpp", help="llama.cpp tree (default: $LLAMA_CPP_DIR, else the pinned copy)")
    parser.add_argument("--output", type=Path, help="JSON results file")
    args = parser.parse_args(argv)

    from loraft.errors import RunError
    from loraft.export import llamacpp
    from loraft.export.gguf import export_gguf

    outtypes = args.outtype or ["f32", "f16", "bf16", "q8_0"] + (
        ["q4_k_m"] if llamacpp.find_quantize(args.llama_cpp) else [])
    rows = []
    for run in args.runs:
        for outtype, adapter_only in [(t, False) for t in outtypes] + [("f32", True)]:
            with tempfile.TemporaryDirectory(prefix="loraft-gguf-bench-") as tmp:
                started = time.time()
                try:
                    report = export_gguf(run, Path(tmp) / "out", outtype=outtype, adapter_only=adapter_only,
                                         llama_cpp=args.llama_cpp, log=lambda line: None)
                except RunError as exc:
                    rows.append({"run": str(run), "outtype": outtype, "adapter_only": adapter_only,
                                 "error": str(exc)})
                    print(f"{run.name} {outtype}{' adapter' if adapter_only else ''}: {exc}", flush=True)
                    continue
                verify = report["verify"]
                row = {
                    "run": str(run), "outtype": outtype, "adapter_only": adapter_only,
                    "max_abs_logprob_diff": verify["logprob_max_abs_diff"], "tolerance": verify["tolerance"],
                    "top1_equal": f"{verify['top1_equal']}/{len(verify['prompts'])}",
                    "tokenization": f"{verify['tokenization']['equal']}/{verify['tokenization']['strings']}",
                    "passed": verify["passed"], "bytes": report["files"]["bytes"],
                    "seconds": round(time.time() - started, 1),
                    "negative_control": verify.get("base_without_adapter_max_abs_diff"),
                    "tokenizer": report["tokenizer"]["kind"] + (f" {report['tokenizer']['pre_tokenizer']}"
                                                               if report["tokenizer"]["pre_tokenizer"] else ""),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| run | type | max \\|Δ log p\\| | tolerance | top-1 | tokenization | size | export s | base alone |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {Path(row['run']).name} | {row['outtype']} | {row['error']} |||||||")
            continue
        size = sum(row["bytes"].values()) / 2 ** 20
        label = row["outtype"] + (" (adapter)" if row["adapter_only"] else "")
        control = f"{row['negative_control']:.3f}" if row["negative_control"] is not None else ""
        print(f"| {Path(row['run']).name} | {label} | {row['max_abs_logprob_diff']:.5f} | {row['tolerance']} | "
              f"{row['top1_equal']} | {row['tokenization']} | {size:.1f} MiB | {row['seconds']:.0f} | {control} |")
    payload = {"machine": common.machine(), "rows": rows}
    if args.output:
        common.write_json(args.output, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
