"""Which precision this machine computes fastest in: one decision, from the hardware, for every path.

Training, generation, the demo's base pretraining and its fine-tune all resolve `auto` here. The machines
loraft runs on differ by a factor of hundreds in bf16 speed: an AMX Xeon multiplies bf16 about 3-5x faster
than fp32, a Zen 4 with AVX512-BF16 about 2.3x, and an AVX2-only CPU emulates bf16 about 300x *slower*
than fp32. So `auto` never trusts a guess:

- CUDA: bf16 where the GPU supports it, else fp16 (autocast with loss scaling; tensor cores either way).
- Apple MPS: fp32.
- CPU: an x86 CPU whose flags show neither AVX512-BF16 nor AMX has no bf16 hardware: fp32, settled without
  measuring. Otherwise a short probe times a bf16 and an fp32 matmul (about a second, once per machine,
  cached under the loraft cache) and bf16 is chosen only when it is at least BF16_MIN_SPEEDUP x faster.
  The flags alone are not enough: a hypervisor or library may hide the instructions the flags promise
  (oneDNN capped at AVX2, say), and then bf16 is emulated.

Tests force each branch by patching `cpu_bf16_flags`, `measure_matmul_speedup` and `cuda_bf16_supported`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from loraft.errors import ConfigError
from loraft.files import cache_dir, write_json_atomically

logger = logging.getLogger("loraft")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 autocast adds casts and keeps fp32 master weights: below this matmul speedup it does not pay end to end
BF16_MIN_SPEEDUP = 1.5
# Environment variables that change which kernels torch runs, and so what the probe measures.
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
PROBE_VERSION = 1
# The capability override: `fast` treats this CPU's bf16 as fast, `emulated` as emulated, without measuring (tests
# use it to take either branch on any machine; a user can use it to skip or overrule the probe).
CPU_BF16_OVERRIDE = "LORAFT_CPU_BF16"
OVERRIDE_SPEEDUP = {"fast": 4.0, "emulated": 0.01}


def device_type(device: str = "auto") -> str:
    """`cuda`, `mps` or `cpu`: where `device` (auto, cpu, cuda, cuda:N, mps) computes on this machine."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return torch.device(device).type


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is taken as given."""
    return torch.device(device_type(device)) if device == "auto" else torch.device(device)


def resolve_precision(precision: str = "auto", device: str = "auto") -> str:
    """`auto` -> the fastest of bf16/fp16/fp32 that computes the same training function on this device.

    An explicit precision is returned as it is. A training run decides this once, in its plan (loraft.plan);
    this is for what is not a run (the demo's base pretraining, benchmarks).
    """
    if precision != "auto":
        return precision
    return choose_precision(precision, machine_capabilities(device))[0]


@dataclass(frozen=True)
class Capabilities:
    """What this machine can compute fast, as the plan reads it: the device and the evidence for bf16.

    `source` says where the bf16 answer came from: `cuda`, `mps`, `flags` (no bf16 instructions: not measured),
    `probe` (the cached matmul probe) or `override` ($LORAFT_CPU_BF16).
    """

    device: str  # cpu, cuda or mps
    source: str
    cuda_name: Optional[str] = None
    cuda_bf16: Optional[bool] = None
    cpu_bf16_flags: Optional[bool] = None
    bf16_speedup: Optional[float] = None  # bf16 / fp32 matmul GFLOPS on this CPU
    fp32_gflops: Optional[float] = None
    bf16_gflops: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def machine_capabilities(device: str = "auto") -> Capabilities:
    """This machine's capabilities for `device` (auto, cpu, cuda, cuda:N, mps); the CPU probe runs at most once per
    machine (cached), and not at all where the flags or $LORAFT_CPU_BF16 settle it."""
    kind = device_type(device)
    if kind == "cuda":
        return Capabilities("cuda", "cuda", cuda_name=cuda_device_name(), cuda_bf16=cuda_bf16_supported())
    if kind != "cpu":
        return Capabilities(kind, kind)
    override = os.environ.get(CPU_BF16_OVERRIDE, "").strip().lower()
    if override:
        if override not in ("fast", "emulated"):
            raise ConfigError(f"${CPU_BF16_OVERRIDE} must be fast or emulated (got {override!r})")
        return Capabilities("cpu", "override", cpu_bf16_flags=override == "fast",
                            bf16_speedup=OVERRIDE_SPEEDUP[override])
    flags = cpu_bf16_flags()
    if flags is False:
        return Capabilities("cpu", "flags", cpu_bf16_flags=False)
    probe = cpu_probe()
    return Capabilities("cpu", "probe", cpu_bf16_flags=flags, bf16_speedup=round(probe["bf16_speedup"], 3),
                        fp32_gflops=probe["fp32_gflops"], bf16_gflops=probe["bf16_gflops"])


def choose_precision(requested: str, caps: Capabilities) -> tuple[str, str]:
    """(precision, reason): `requested` as given, or what `auto` picks from `caps` (a pure function)."""
    if requested != "auto":
        return requested, "set in the config (train.precision)"
    if caps.device == "cuda":
        if caps.cuda_bf16:
            return "bf16", f"auto: {caps.cuda_name} supports bf16"
        return "fp16", f"auto: {caps.cuda_name} has no bf16; fp16 with loss scaling"
    if caps.device != "cpu":
        return "fp32", f"auto: {caps.device} trains in fp32"
    if caps.source == "override":
        verdict = "fast" if caps.cpu_bf16_flags else "emulated"
        choice = "bf16" if caps.cpu_bf16_flags else "fp32"
        return choice, f"auto: ${CPU_BF16_OVERRIDE}={verdict} says bf16 is {verdict} on this CPU"
    if caps.source == "flags":
        return "fp32", "auto: the CPU flags show neither AVX512-BF16 nor AMX, so bf16 would be emulated"
    speedup = caps.bf16_speedup or 0.0
    measured = (f"the matmul probe measured bf16 at {speedup:.2f}x fp32 ({caps.bf16_gflops} vs "
                f"{caps.fp32_gflops} GFLOPS)")
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"auto: {measured}, at least the {BF16_MIN_SPEEDUP}x that pays"
    return "fp32", f"auto: {measured}, below the {BF16_MIN_SPEEDUP}x that pays"


def cuda_bf16_supported() -> bool:
    return torch.cuda.is_bf16_supported()


def cuda_device_name() -> str:
    return torch.cuda.get_device_name(0)


def cpu_bf16_flags() -> Optional[bool]:
    """Whether the CPU advertises bf16 matmul instructions: True/False on x86 (AVX512-BF16 or AMX), None where
    the flags do not tell (other architectures)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_prefers_bf16() -> bool:
    """bf16 on this CPU only when its flags allow it and the probe measured it clearly faster than fp32."""
    return choose_precision("auto", machine_capabilities("cpu"))[0] == "bf16"


@functools.lru_cache(maxsize=None)
def cpu_probe() -> dict:
    """The bf16-vs-fp32 matmul probe of this machine: measured once, then read from the cache.

    Returns:
        {"bf16_speedup": bf16 GFLOPS / fp32 GFLOPS, "fp32_gflops", "bf16_gflops", "cpu", "key", ...}
    """
    identity = machine_identity()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir("probe") / f"precision-{key}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("identity") == identity and isinstance(cached.get("bf16_speedup"), (int, float)):
            return cached
    except (OSError, ValueError):
        pass
    fp32, bf16 = measure_matmul_speedup()
    result = {"bf16_speedup": bf16 / fp32, "fp32_gflops": round(fp32, 2), "bf16_gflops": round(bf16, 2),
              "identity": identity, "key": key, "measured": time.time()}
    logger.info("precision probe: bf16 matmul %.1f GFLOPS, fp32 %.1f GFLOPS (%.2fx) on %s",
                bf16, fp32, bf16 / fp32, identity["cpu"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, result)
    except OSError:
        pass  # a read-only cache only costs re-measuring next time
    return result


def measure_matmul_speedup(size: int = 512, rounds: int = 3, seconds: float = 0.08) -> tuple[float, float]:
    """(fp32 GFLOPS, bf16 GFLOPS) of a size^3 matmul: the best of `rounds` alternating timings of each.

    Alternating keeps a busy neighbour from favouring one dtype. 512^3 is large enough to reach the GEMM
    kernels' speed and small enough that an emulated bf16 matmul (0.3 GFLOPS seen on an AVX2 EPYC) still
    ends in about a second: a dtype slower than `seconds` per matmul is timed once.
    """
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(size, size, generator=generator)
    operands = {dtype: (base.to(dtype), base.t().contiguous().to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: 0.0 for dtype in operands}
    slow = set()
    for dtype, (a, b) in operands.items():  # warm-up: kernel selection, packing buffers
        started = time.perf_counter()
        a @ b
        if time.perf_counter() - started > seconds:
            slow.add(dtype)
    flops = 2 * size**3
    for round_index in range(rounds):
        for dtype, (a, b) in operands.items():
            if dtype in slow and round_index:
                continue
            count, started = 0, time.perf_counter()
            while True:
                a @ b
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= seconds or count >= 100:
                    break
            best[dtype] = max(best[dtype], flops * count / elapsed / 1e9)
    return best[torch.float32], best[torch.bfloat16]


def machine_identity() -> dict:
    """What the probe's answer depends on: the CPU, its flags, torch, and the kernel-selection environment."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "version": PROBE_VERSION, "cpu": cpu, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
    }


def hardware_class(device: str = "auto") -> str:
    """A short name for the kind of machine, as benchmarks and docs report it: `cuda-bf16 (NAME)`,
    `cpu-amx`, `cpu-avx512bf16`, `cpu-fp32-only` (bf16 emulated or absent), `mps`, `cpu-other`."""
    kind = device_type(device)
    if kind == "cuda":
        return f"cuda-{'bf16' if cuda_bf16_supported() else 'fp16'} ({torch.cuda.get_device_name(0)})"
    if kind == "mps":
        return "mps"
    if not cpu_prefers_bf16():
        return "cpu-fp32-only"
    isa_cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() and ("AMX" in isa_cap or isa_cap == "ALL"):
        return "cpu-amx"
    return "cpu-avx512bf16" if cpu_bf16_flags() else "cpu-bf16"


def choose_inference_dtype(requested: Optional[str], caps: Capabilities) -> tuple[str, str]:
    """(dtype name, reason) for generation's weights: `auto` = what training's auto picks here (bf16 where it is
    fast: decoding one token reads every weight once, so bf16 halves the bytes per token), else as given; None =
    fp32, the function the adapter was trained against (evaluation)."""
    if requested is None:
        return "fp32", "fp32: the trained function exactly"
    if requested != "auto":
        return requested, "set (generation.dtype or --dtype)"
    choice, reason = choose_precision("auto", caps)
    return choice, reason
