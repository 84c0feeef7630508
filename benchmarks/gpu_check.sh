#!/usr/bin/env bash
# GPU readiness in one go, within 10 minutes: the GPU and torch's view of it, the test suite on CUDA, training
# speed at the bloom-1b4-zh shape (reference, trl, loraft), generation speed, QLoRA's GPU memory and packing. Run from the repository root of a
# checkout installed as the README says (torch for this GPU, then pip install -e '.[test,bench]'):
#
#     benchmarks/gpu_check.sh [OUT_DIR]          # default: $OUT if set, else gpu-check-out/
#
# Every step runs under its own time limit and the next one runs whatever happened; OUT_DIR/status.txt records
# each step's exit status (124 = stopped at its time limit). At most 10 files land in OUT_DIR.
set -uo pipefail

out_dir=${1:-${OUT:-gpu-check-out}}
mkdir -p "$out_dir" && out_dir=$(cd "$out_dir" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The benchmarks' random-weight models (GBs) and run folders go to a scratch folder, removed at the end,
# unless LORAFT_BENCH_CACHE names one to keep.
scratch=""
if [ -z "${LORAFT_BENCH_CACHE:-}" ]; then
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/loraft-gpu-check.XXXXXX") || exit 1
  export LORAFT_BENCH_CACHE=$scratch
fi
total_budget_s=560  # 10 minutes less the packing of results at the end
failed=0
: >"$out_dir/status.txt"

# step NAME SECONDS LOG COMMAND...: run with a limit (never past the total budget), log, record the exit status
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((total_budget_s - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "$name: skipped (time budget spent)" | tee -a "$out_dir/status.txt"
    failed=1
    return
  fi
  echo "== $name (limit ${limit}s)"
  echo "== $name (limit ${limit}s): $*" >>"$log"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local code=$?
  ((code == 0)) || failed=1
  echo "$name: exit $code after $((SECONDS - started))s (log: $(basename "$log"))" | tee -a "$out_dir/status.txt"
}

# (1) the GPU, and what torch and loraft make of it
step system 30 "$out_dir/system.txt" nvidia-smi
step torch-cuda 40 "$out_dir/system.txt" "$python" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "bf16", torch.cuda.is_bf16_supported(), "memory GiB", round(torch.cuda.mem_get_info()[1] / 2**30, 1))
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    print("bf16 matmul ok:", bool(torch.isfinite(x @ x).all()))
from loraft.precision import hardware_class, resolve_device, resolve_precision
print("loraft: model.device=auto ->", resolve_device("auto"), "| train.precision=auto ->", resolve_precision("auto"),
      "|", hardware_class())
'

# (2) the test suite, on CUDA: model.device=auto picks it
step pytest 170 "$out_dir/pytest.log" "$python" -m pytest -q -x --durations=15

# (3) training speed at the reference shape; loraft runs bf16 here through train.precision=auto
step train-speed 200 "$out_dir/train_speed.log" "$python" benchmarks/train_speed.py --shape bloom-1b4-zh \
  --samples 96 --variants reference,trl,loraft --json "$out_dir/train_speed.json"

# (4) generation speed: the reference pipeline vs loraft generate
step generate-speed 80 "$out_dir/generate_speed.log" "$python" benchmarks/generate_speed.py --shape bloom-1b4-zh \
  --prompts 8 --json "$out_dir/generate_speed.json"

# (5) QLoRA: peak GPU memory of bf16 LoRA and NF4 at the bloom-1b4-zh shape (the column CPU runs leave empty)
step qlora-memory 90 "$out_dir/qlora_memory.log" "$python" benchmarks/qlora_memory.py --steps 2 --modes bf16,nf4

# (6) packing against length-grouped padding, where varlen/masked attention kernels differ from the CPU's
step packing 90 "$out_dir/packing.log" "$python" benchmarks/train_speed.py --shape bloom-1b4-zh --samples 48 \
  --variants loraft,loraft:train.packing=true

# the benchmarks' per-variant logs and raw results, as one file (the models and data stay behind)
if [ -d "$LORAFT_BENCH_CACHE/runs" ]; then
  tar -czf "$out_dir/bench-runs.tar.gz" -C "$LORAFT_BENCH_CACHE" --exclude='data' --exclude='*.safetensors' runs \
    && echo "bench-runs: packed" >>"$out_dir/status.txt"
fi
[ -n "$scratch" ] && rm -rf "$scratch"
echo "total: ${SECONDS}s" >>"$out_dir/status.txt"
echo "== summary"
cat "$out_dir/status.txt"
exit "$failed"
