"""A GGUF file as the base model (issue 25), measured in one run on SmolLM2-135M-Instruct (Q4_1, 98 MB):

    python benchmarks/gguf_base.py [--docs docs/benchmarks.md] [--json benchmarks/results/NAME.json]
    python benchmarks/gguf_base.py --header [--json ...]   # only 0. below
    python benchmarks/gguf_base.py --dequantize [--json ...]   # only the load hf_folder dequantizes with (1. below)

0. Reading the file's header (loraft.gguf_base.header_fields: every scalar and string key, as architecture() and
   file_type() read one) against gguf's GGUFReader, which decodes the tokenizer's arrays too; --repeats each, in turn.

1. Dequantizing: with --dequantize alone, transformers' from_pretrained(dir, gguf_file=..., dtype=fp32) as
   loraft.gguf_base.hf_folder calls it (given the config it has just saved) against the same call without it (the
   file's metadata parsed again), in turn, --repeats each, in this process. Otherwise: what the first use of a GGUF file costs (loraft.gguf_base.hf_folder: config + tokenizer, then the
   weights dequantized and saved under a fresh $LORAFT_HOME, then the folder loaded), what every later command
   costs (the cached folder), and plain transformers' `from_pretrained(dir, gguf_file=...)`, which dequantizes at
   every load; fp32 and bf16, each measurement in its own process (its peak RSS is its own), medians of --repeats.
2. A task the base cannot do: an ISO date as DD/MM/YYYY (2024-03-15 -> 15/03/2024), train and held-out dates drawn
   apart (seeded). `loraft train gguf-lora` on the file with the settings users get (autotune on, precision auto),
   then `loraft eval RUN --data heldout.jsonl --base`: held-out exact match of the base and the run (greedy, the
   model's chat template); wall time and peak RSS of each command.
3. `loraft export RUN --format gguf --adapter-only` (the adapter on the original Q4_1 file, its negative control the
   file alone) and `--outtype q8_0` (merged): what each export_report.json measured.
4. The tolerance per base type: the run's LoRA GGUF (from 3) on bases of other types made from the same weights —
   f16 and q8_0 by llama.cpp's converter from the dequantized folder; q4_0, q5_0, q5_1 by requantizing the file's
   Q4_1 tensors with gguf-py (llama.cpp's reference quantizers, ported); llama-quantize's types where one is found
   ($LLAMA_QUANTIZE, PATH) — each compared in llama.cpp with the adapter and without it (the control) against its
   own reference in transformers: that base dequantized, plus the same adapter, merged in fp32 (what an export of
   a run trained on that file compares with). Also against the Q4_1 run's reference, which adds the weights' own
   requantization error.

Every command runs with a fresh $LORAFT_HOME under the work folder (so the first `loraft train` also dequantizes
and autotunes, as a user's first run does); llama.cpp's converter is taken from the caller's cache when it is there.
Before each timed command the script waits (up to --wait-quiet s) until the other processes use under a quarter of a
core, and records what they used. The chosen tolerances live in loraft.export.verify.TOLERANCES; the table shows
3x the measured difference beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## A GGUF file as the base (SmolLM2-135M-Instruct)"
REQUANTIZED = ("q4_0", "q5_0", "q5_1")  # gguf-py quantizes these (and q4_1, q8_0) in numpy
QUANTIZER_TYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}  # need llama-quantize
TASK_PROMPT = "Rewrite the date {iso} as DD/MM/YYYY. Answer with the date only."


# ------------------------------------------------------------------------------------ step 1, worker side


def load_worker(kind: str, gguf: Path, dtype_name: str) -> dict:
    """One timed load in this process (imports done before the clock starts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraft import gguf_base

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    rss_after_imports = common.peak_rss_gib()
    times = {}

    def load_folder(folder):
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(str(folder), variant=dtype_name, dtype=dtype)
        AutoTokenizer.from_pretrained(str(folder))
        times["load_s"] = time.perf_counter() - started

    started = time.perf_counter()
    if kind == "first":  # config + tokenizer (with the sha256), then the weights, then what a command loads
        gguf_base.hf_folder(str(gguf), log=lambda line: None)
        times["config_tokenizer_s"] = time.perf_counter() - started
        started = time.perf_counter()
        folder = gguf_base.hf_folder(str(gguf), weights=dtype_name, log=lambda line: None)
        times["weights_s"] = time.perf_counter() - started
        load_folder(folder)
    elif kind == "cached":
        folder = gguf_base.hf_folder(str(gguf), weights=dtype_name, log=lambda line: None)
        times["config_tokenizer_s"] = time.perf_counter() - started  # the folder found: the file's stat, no hashing
        times["weights_s"] = 0.0
        load_folder(folder)
    else:  # plain transformers: what every load costs without the cache
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        times["config_tokenizer_s"] = time.perf_counter() - started
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        times["weights_s"] = time.perf_counter() - started
        times["load_s"] = 0.0
    times["total_s"] = times["config_tokenizer_s"] + times["weights_s"] + times["load_s"]
    return {**times, "peak_rss_gib": common.peak_rss_gib(), "rss_after_imports_gib": rss_after_imports}


# ------------------------------------------------------------------------------------ measuring a process


def config_reuse_timings(gguf: Path, repeats: int) -> dict:
    """Seconds of the dequantizing load with the config passed (as hf_folder does) and without it, in turn."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraft.gguf_base import hf_folder

    folder = hf_folder(str(gguf))  # its config and tokenizer only, as hf_folder has them when it dequantizes
    seconds: dict[str, list[float]] = {"config_passed": [], "file_parsed_again": []}
    for _ in range(repeats):
        for name in seconds:
            extra = {"config": AutoConfig.from_pretrained(str(folder))} if name == "config_passed" else {}
            started = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                         **extra)
            seconds[name].append(round(time.perf_counter() - started, 3))
            del model
    return {"benchmark": "gguf dequantizing load", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": common.machine(), "file": str(gguf), "threads": torch.get_num_threads(), "seconds": seconds}


def header_timings(gguf: Path, repeats: int) -> dict:
    """Seconds to read the file's metadata: gguf's GGUFReader against loraft.gguf_base.header_fields, in turn."""
    from gguf import GGUFReader, GGUFValueType

    from loraft.gguf_base import header_fields

    fields = GGUFReader(str(gguf)).fields
    keys = {key for key, field in fields.items()
            if not key.startswith("GGUF.") and field.types[0] != GGUFValueType.ARRAY}
    reader, header = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        GGUFReader(str(gguf))
        reader.append(round(time.perf_counter() - started, 4))
        started = time.perf_counter()
        header_fields(gguf, keys)
        header.append(round(time.perf_counter() - started, 4))
    return {"benchmark": "gguf header", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": common.machine(), "file": str(gguf), "keys": len(keys), "gguf_reader_s": reader,
            "header_fields_s": header}


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores the machine's processes used over the next `seconds` (from /proc/stat)."""
    def read():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # idle + iowait

    total, idle = read()
    time.sleep(seconds)
    total_after, idle_after = read()
    return (os.cpu_count() or 1) * (1 - (idle_after - idle) / max(total_after - total, 1))


def wait_quiet(limit: float) -> float:
    """Wait until other processes use under a quarter of a core, at most `limit` s; returns what they used."""
    deadline = time.time() + limit
    while True:
        busy = busy_cores()
        if busy < 0.25 or time.time() >= deadline:
            return round(busy, 2)
        time.sleep(8)


def run_measured(command: list, env: dict, log_path: Path, quiet_limit: float) -> dict:
    """Run `command`, output to `log_path`; its wall time and its own peak RSS (wait4: it and its children)."""
    busy = wait_quiet(quiet_limit)
    load_before = common.load_average()
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "rc": process.returncode, "busy_cores_before": busy,
            "load_average": [round(load_before, 2), round(common.load_average(), 2)], "log": str(log_path)}


def cpu_id() -> str:
    """The CPU's family and model numbers (a VM's model name is often just "Intel(R) Xeon(R) Processor")."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def loraft(*arguments) -> list:
    return [sys.executable, "-m", "loraft.cli", *map(str, arguments)]


# ------------------------------------------------------------------------------------ step 1


def dequantize_timings(gguf: Path, work: Path, env: dict, repeats: int, quiet_limit: float) -> dict:
    rows: dict = {}
    for repeat in range(repeats):
        for dtype in ("fp32", "bf16"):
            home = work / f"home-load-{repeat}-{dtype}"  # fresh: the first use reads and dequantizes the file
            for kind in ("first", "cached", "transformers"):
                out = work / f"load-{kind}-{dtype}-{repeat}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--dtype", dtype,
                           "--gguf", str(gguf), "--out", str(out)]
                measured = run_measured(command, {**env, "LORAFT_HOME": str(home)},
                                        work / f"load-{kind}-{dtype}-{repeat}.log", quiet_limit)
                if measured["rc"]:
                    raise SystemExit(f"load worker {kind} {dtype} failed: see {measured['log']}")
                result = {**json.loads(out.read_text()), "process_wall_s": measured["wall_s"],
                          "busy_cores_before": measured["busy_cores_before"]}
                rows.setdefault(f"{kind}/{dtype}", []).append(result)
                print(f"[load] {kind:12} {dtype}: {result['total_s']:.1f} s, peak RSS "
                      f"{result['peak_rss_gib']:.2f} GiB (other processes {measured['busy_cores_before']} cores)",
                      flush=True)
            shutil.rmtree(home, ignore_errors=True)
    summary = {}
    for key, results in rows.items():
        summary[key] = {field: round(statistics.median(r[field] for r in results), 2)
                        for field in ("config_tokenizer_s", "weights_s", "load_s", "total_s", "peak_rss_gib",
                                      "rss_after_imports_gib")}
        summary[key]["busy_cores_before"] = max(r["busy_cores_before"] for r in results)
        summary[key]["runs"] = results
    return summary


# ------------------------------------------------------------------------------------ step 2


def task_data(folder: Path, train_count: int, heldout_count: int, seed: int) -> tuple[Path, Path]:
    """Dates 1950-2049 drawn without replacement: no held-out date appears in training."""
    rng = random.Random(seed)
    first = datetime.date(1950, 1, 1)
    offsets = rng.sample(range((datetime.date(2050, 1, 1) - first).days), train_count + heldout_count)

    def record(offset):
        day = first + datetime.timedelta(days=offset)
        return {"instruction": TASK_PROMPT.format(iso=day.isoformat()), "input": "",
                "output": day.strftime("%d/%m/%Y")}

    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, chosen in zip(paths, (offsets[:train_count], offsets[train_count:])):
        path.write_text("".join(json.dumps(record(o)) + "\n" for o in chosen), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------ step 4


def requantize(source: Path, target: Path, type_name: str) -> None:
    """`source` with its Q4_1 tensors requantized to `type_name` (gguf-py's port of llama.cpp's reference
    quantizers); every other tensor and all metadata copied, general.file_type set."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(str(target), bytes(architecture.parts[architecture.data[0]]).decode())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == "general.file_type":
            value = gguf.LlamaFileType[f"MOSTLY_{type_name.upper()}"].value
        value_type = field.types[0]
        writer.add_key_value(field.name, value, value_type,
                             sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    tensors = []
    for tensor in reader.tensors:
        data, data_type = tensor.data, tensor.tensor_type
        if data_type == gguf.GGMLQuantizationType.Q4_1:
            data, data_type = gguf.quants.quantize(gguf.quants.dequantize(data, data_type), qtype), qtype
        tensors.append((tensor.name, np.ascontiguousarray(data), data_type))
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, data_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()


def make_bases(gguf: Path, folder: Path, bases_dir: Path, log_path: Path) -> dict:
    """{type: (path, how it was made)}: the original, and the other types from the same weights."""
    from transformers import AutoTokenizer

    from loraft.export import llamacpp

    bases_dir.mkdir(parents=True, exist_ok=True)
    bases = {"q4_1": (gguf, "the original file")}
    converter = llamacpp.locate_converter(None)
    verdict = llamacpp.check_tokenizer(folder, AutoTokenizer.from_pretrained(str(folder)), converter)
    fallback = verdict.name if verdict.kind == "fallback" else None
    for outtype in ("f16", "q8_0"):
        path = bases_dir / f"base-{outtype}.gguf"
        llamacpp.run_converter(converter, "convert_hf_to_gguf.py",
                               [str(folder), "--outfile", str(path), "--outtype", outtype], log_path, fallback)
        bases[outtype] = (path, "convert_hf_to_gguf.py from the dequantized weights")
    for type_name in REQUANTIZED:
        path = bases_dir / f"base-{type_name}.gguf"
        requantize(gguf, path, type_name)
        bases[type_name] = (path, "the file's Q4_1 tensors requantized (gguf-py)")
    quantizer = llamacpp.find_quantize(None)
    if quantizer is not None:
        for type_name, quantizer_name in QUANTIZER_TYPES.items():
            path = bases_dir / f"base-{type_name}.gguf"
            llamacpp.quantize(quantizer, bases["f16"][0], path, quantizer_name, log_path)
            bases[type_name] = (path, f"llama-quantize ({quantizer}) from the f16 base")
    return bases


def merged_reference(model, run_dir: Path, tokenizer):
    """`model` (a base in fp32) with the run's adapter merged: what an export of a run on that base compares with."""
    from peft import PeftModel

    from loraft.export.verify import Reference

    merged = PeftModel.from_pretrained(model, str(run_dir)).merge_and_unload().eval()
    return Reference(merged, tokenizer)


def tolerance_per_type(bases: dict, run_dir: Path, lora_path: Path, folder: Path, heldout: Path,
                       log_path: Path) -> list[dict]:
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraft.export.verify import PROBE_CONVERSATIONS, TOLERANCES, verify_gguf

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))  # the run's: the file's chat template
    task = [[{"role": "user", "content": json.loads(line)["instruction"]}]
            for line in heldout.read_text().splitlines()[:3]]
    conversations = list(PROBE_CONVERSATIONS) + task  # the export's probes, then three held-out task prompts
    probes = len(PROBE_CONVERSATIONS)
    run_model = AutoModelForCausalLM.from_pretrained(str(folder), variant="fp32", dtype=torch.float32)
    run_reference = merged_reference(run_model, run_dir, tokenizer)

    def check(path, reference, lora):
        result = verify_gguf(path, None, "given", log_path, lora_path=lora, conversations=conversations,
                             reference=reference, tolerance=math.inf)
        diffs = [p["max_abs_diff"] for p in result["prompts"]]
        return {"max": max(diffs), "probes": max(diffs[:probes]), "task": max(diffs[probes:]),
                "top1": f"{result['top1_equal']}/{len(diffs)}",
                "tokenization": f"{result['tokenization']['equal']}/{result['tokenization']['strings']}",
                "template": all(p["template_text_equal"] and p["chat_tokens_equal"] for p in result["prompts"]),
                "outside_top": result["outside_llama_cpp_top"]}

    rows = []
    for type_name, (path, how) in bases.items():
        print(f"[types] {type_name}: its reference in transformers, then llama.cpp with and without the adapter",
              flush=True)
        if type_name == "q4_1":
            reference = run_reference
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            reference = merged_reference(model, run_dir, tokenizer)
        with_adapter = check(path, reference, lora_path)
        control = check(path, reference, None)
        against_run = with_adapter if type_name == "q4_1" else check(path, run_reference, lora_path)
        rows.append({"type": type_name, "how": how, "bytes": path.stat().st_size, "with_adapter": with_adapter,
                     "control": control, "with_adapter_vs_q4_1_run": against_run,
                     "control_ratio": control["max"] / max(with_adapter["max"], 1e-12),
                     "three_times": 3 * with_adapter["max"], "tolerance": TOLERANCES.get(type_name)})
        print(f"[types] {type_name}: with adapter {with_adapter['max']:.4f}, base alone {control['max']:.3f}, "
              f"against the Q4_1 run {against_run['max']:.4f}", flush=True)
        del reference
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------ the report


def fmt(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    # the tolerances as they are now: `--report` shows a choice made after the run
    from loraft.export.verify import PROBE_CONVERSATIONS, TOLERANCES

    machine, loads, task = result["machine"], result["dequantize"], result["task"]
    bf16 = (f"native bf16 ({', '.join(machine['isa'])}), the precision probe measured bf16 at "
            f"{machine['probe_bf16_speedup']:.1f}x fp32" if machine["isa"] else "no native bf16")
    lines = [SECTION, "",
             f"Measured {result['date']} on {machine['cpu']} ({machine.get('cpu_id', '')}, {machine['cores']} cores, "
             f"{machine['memory_gib']} GiB, {bf16}: hardware class {machine['hardware_class']}, precision `auto` "
             f"picks {machine['auto_precision']}), torch {machine['torch']}, "
             f"transformers {result['versions']['transformers']}, peft {result['versions']['peft']}, xllamacpp "
             f"{result['versions']['xllamacpp']}, gguf {result['versions']['gguf']}: `{result['command']}`, "
             f"{result['seconds'] / 60:.0f} min in all. The file: {result['gguf']['name']} "
             f"({result['gguf']['mib']:.0f} MiB, {result['gguf']['file_type']}).", "",
             "### Dequantizing once, and every later load",
             "",
             f"Median of {result['repeats']}, each in its own process (peak RSS includes ~"
             f"{fmt(loads['cached/fp32']['rss_after_imports_gib'])} GiB of imports); \"other processes\" is the most "
             "cores the machine's other processes used just before a run.", "",
             "| load | dtype | config + tokenizer s | weights s | load of the folder s | total s | peak RSS GiB | "
             "other processes (cores) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    names = {"first": "first use: `hf_folder` reads, dequantizes, saves; then the folder loads",
             "cached": "every later command: the cached folder",
             "transformers": "plain transformers `from_pretrained(dir, gguf_file=...)`, at every load"}
    for kind in ("first", "cached", "transformers"):
        for dtype in ("fp32", "bf16"):
            row = loads[f"{kind}/{dtype}"]
            lines.append(f"| {names[kind]} | {dtype} | {fmt(row['config_tokenizer_s'])} | {fmt(row['weights_s'])} | "
                         f"{fmt(row['load_s'])} | **{fmt(row['total_s'])}** | {fmt(row['peak_rss_gib'])} | "
                         f"{row['busy_cores_before']} |")
    train, evaluation = task["train"], task["eval"]
    lines += ["", "### A task before and after", "",
              f"ISO date to DD/MM/YYYY (`{TASK_PROMPT.format(iso='2024-03-15')}` → `15/03/2024`): "
              f"{task['train_records']} training dates, {task['heldout_records']} held-out dates none of which is in "
              f"training (seed {task['seed']}). `{task['train_command']}` (the preset's settings: LoRA r 16 on every "
              f"linear layer, batch 16, lr {task['learning_rate']}, cosine; autotune on, precision "
              f"{task['precision']}), then `loraft eval RUN --data heldout.jsonl --base` (greedy, the file's chat "
              "template).", "",
              "| held-out exact match, base → run | steps | `loraft train` wall (of it: training loop) | "
              "peak RSS | `loraft eval --base` wall | other processes (cores) |",
              "|---|---:|---:|---:|---:|---:|",
              f"| {evaluation['base_exact_match']:.0f}% → **{evaluation['run_exact_match']:.0f}%** | "
              f"{task['steps']} | "
              f"{train['wall_s']:.0f} s ({task['train_runtime_s']:.0f} s) | {train['peak_rss_gib']:.2f} GiB | "
              f"{evaluation['wall_s']:.0f} s | {train['busy_cores_before']} / {evaluation['busy_cores_before']} |",
              "", "Sample answers (held-out):", ""]
    for sample in task["samples"]:
        lines.append(f"- `{sample['prompt']}`: base `{sample['base']}`, run `{sample['run']}` "
                     f"(reference `{sample['reference']}`)")
    fixed = len(PROBE_CONVERSATIONS)
    lines += ["", "### llama.cpp against transformers: the exports", "",
              "What each `export_report.json` says: max |Δ log p| over transformers' top-5 first tokens of each "
              f"prompt ({fixed} fixed probe prompts, plus any of the run's own the export adds), against the merged "
              "run in transformers (fp32).", "",
              "| export | llama.cpp computes with | prompts | max \\|Δ log p\\| | tolerance | top-1 | tokenization | "
              "template | base alone (control) | export wall | passed |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for export in result["exports"]:
        prompts = export["report"]["verify"]["prompts"]
        extra = f" + {len(prompts) - fixed} of the run's" if len(prompts) > fixed else ""
        lines.append(f"| `{export['command']}` | {export['base']} | {fixed}{extra} | {fmt(export['max'], 3)} | "
                     f"{export['tolerance']} | {export['top1']} | {export['tokenization']} | "
                     f"{'equal' if export['template'] else 'DIFFERS'} | {fmt(export.get('control'), 2)} | "
                     f"{export['wall_s']:.0f} s | {'yes' if export['passed'] else '**no**'} |")
    lines += ["", "### The tolerance per base type", "",
              "The run's LoRA GGUF (from the adapter-only export) on each base, against that base dequantized + the "
              "adapter merged in transformers (fp32): max |Δ log p| over transformers' top-5 first tokens, on the "
              f"{fixed} fixed probe prompts and on 3 held-out task prompts. \"vs the Q4_1 run\": with the adapter "
              "against the run's own reference instead, which adds the base's requantization of the Q4_1 weights. "
              "The ratios take the largest difference over all 8 prompts.", "",
              "| base type | made by | size MiB | with adapter: probes / task | base alone: probes / task | "
              "base alone / with adapter | base alone / tolerance | vs the Q4_1 run | 3x measured | "
              "tolerance (verify.py) | top-1 | tokenization, template |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["types"]:
        adapter, control = row["with_adapter"], row["control"]
        lines.append(f"| {row['type']} | {row['how']} | {row['bytes'] / 2**20:.0f} | "
                     f"{adapter['probes']:.3f} / {adapter['task']:.3f} | {control['probes']:.2f} / "
                     f"{control['task']:.2f} | {control['max'] / max(adapter['max'], 1e-12):.1f}x | "
                     f"{control['max'] / TOLERANCES.get(row['type'], 1.5):.1f}x | "
                     f"{row['with_adapter_vs_q4_1_run']['max']:.3f} | {row['three_times']:.2f} | "
                     f"{TOLERANCES.get(row['type'])} | {adapter['top1']} | {adapter['tokenization']}, "
                     f"{'equal' if adapter['template'] else 'DIFFERS'} |")
    if not result["quantizer"]:
        lines += ["", "No llama-quantize was found ($LLAMA_QUANTIZE, PATH): the k-quant types (q4_k_m, q5_k_m, q6_k) "
                  "were not measured."]
    return "\n".join(wrap(line) for line in lines) + "\n"


def wrap(line: str, width: int = 118) -> str:
    """A prose line folded as the rest of docs/benchmarks.md is (tables and headings stay one line)."""
    if line.startswith(("|", "#")) or len(line) <= width:
        return line
    indent = "  " if line.startswith("- ") else ""
    return textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def write_docs(path: Path, section: str) -> None:
    """Put `section` into the benchmarks document: replace its earlier version, else insert it first (newest
    first, after the introduction)."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(SECTION) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        first = text.index("\n## ") + 1
        text = text[:first] + section + "\n" + text[first:]
    path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------ the run


def export_row(command: str, measured: dict, report_path: Path, base: str) -> dict:
    report = json.loads(report_path.read_text())
    verify = report["verify"]
    return {"command": command, "base": base, "max": verify["logprob_max_abs_diff"], "tolerance": verify["tolerance"],
            "top1": f"{verify['top1_equal']}/{len(verify['prompts'])}",
            "tokenization": f"{verify['tokenization']['equal']}/{verify['tokenization']['strings']}",
            "template": all(p["template_text_equal"] and p["chat_tokens_equal"] for p in verify["prompts"]),
            "control": verify.get("base_without_adapter_max_abs_diff"), "passed": verify["passed"],
            "wall_s": measured["wall_s"], "peak_rss_gib": measured["peak_rss_gib"], "rc": measured["rc"],
            "busy_cores_before": measured["busy_cores_before"], "report": report}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="the base file (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    parser.add_argument("--repeats", type=int, default=3, help="loads timed per kind and dtype (median)")
    parser.add_argument("--train-records", type=int, default=400)
    parser.add_argument("--heldout-records", type=int, default=50)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of 16 samples")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="the preset's")
    parser.add_argument("--seed", type=int, default=0, help="the task data's")
    parser.add_argument("--wait-quiet", type=float, default=180, help="most seconds to wait for an idle machine")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder, removed)")
    parser.add_argument("--docs", type=Path, help="write the section into this markdown file (docs/benchmarks.md)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print (and --docs) a saved run's section again")
    parser.add_argument("--header", action="store_true", help="only time reading the file's header (0. above)")
    parser.add_argument("--dequantize", action="store_true",
                        help="only time the dequantizing load with and without the saved config (1. above)")
    parser.add_argument("--worker", choices=["first", "cached", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        common.write_json(args.out, load_worker(args.worker, args.gguf, args.dtype))
        return 0
    if args.header or args.dequantize:
        from loraft.smollm2 import smollm2_gguf

        timings = header_timings if args.header else config_reuse_timings
        result = timings((args.gguf or smollm2_gguf()).resolve(), args.repeats)
        print(json.dumps(result, indent=1))
        if args.json:
            common.write_json(args.json, result)
        return 0
    if args.report:
        section = markdown(json.loads(args.report.read_text(encoding="utf-8")))
        print(section)
        if args.docs:
            write_docs(args.docs, section)
        return 0

    started = time.time()
    from loraft.export import llamacpp
    from loraft.smollm2 import smollm2_gguf

    gguf = (args.gguf or smollm2_gguf()).resolve()
    caller_converter = llamacpp.pinned_dir()  # the caller's copy, before $LORAFT_HOME points at the work folder
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loraft-gguf-base-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    os.environ["LORAFT_HOME"] = str(home)  # this process and every command it runs: a fresh cache
    os.environ.pop("LORAFT_CACHE_DIR", None)
    if not os.environ.get(llamacpp.ENV_DIR) and (caller_converter / llamacpp.STAMP).is_file():
        os.environ[llamacpp.ENV_DIR] = str(caller_converter)
    env = dict(os.environ)
    from loraft import gguf_base

    result: dict = {"date": datetime.date.today().isoformat(), "command": common.command_line(__file__),
                    "repeats": args.repeats, "machine": {**common.machine(), "cpu_id": cpu_id()},
                    "gguf": {"path": str(gguf), "name": gguf.name, "mib": gguf.stat().st_size / 2**20,
                             "file_type": gguf_base.file_type(gguf)}}
    from importlib.metadata import version

    import peft
    import transformers

    result["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__,
                          "xllamacpp": version("xllamacpp"), "gguf": version("gguf")}
    print(f"[bench] work folder {work}; machine {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"auto precision {result['machine']['auto_precision']}", flush=True)

    # 1. dequantizing
    result["dequantize"] = dequantize_timings(gguf, work, env, args.repeats, args.wait_quiet)

    # 2. the task
    train_path, heldout_path = task_data(work / "data", args.train_records, args.heldout_records, args.seed)
    run_dir = work / "run"
    overrides = [f"model.name_or_path={gguf}", f"data.path={train_path}", f"output_dir={run_dir}",
                 f"train.max_steps={args.steps}", f"train.learning_rate={args.learning_rate}"]
    print(f"[task] loraft train gguf-lora ({args.steps} steps)", flush=True)
    train = run_measured(loraft("train", "gguf-lora", *overrides), env, work / "train.log", args.wait_quiet)
    if train["rc"]:
        raise SystemExit(f"loraft train failed: see {train['log']}")
    print("[task] eval: held-out exact match of the base and the run", flush=True)
    evaluation = run_measured(loraft("eval", run_dir, "--data", heldout_path, "--base"), env, work / "eval.log",
                              args.wait_quiet)
    if evaluation["rc"]:
        raise SystemExit(f"loraft eval failed: see {evaluation['log']}")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    record = json.loads((run_dir / "loraft_run.json").read_text())
    runtime = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result["task"] = {
        "train_records": args.train_records, "heldout_records": args.heldout_records, "seed": args.seed,
        "steps": args.steps, "learning_rate": args.learning_rate, "precision": record["plan"]["precision"],
        "train_command": "loraft train gguf-lora model.name_or_path=FILE data.path=train.jsonl "
                         f"train.max_steps={args.steps}",
        "train": train, "train_runtime_s": max(m.get("train_runtime", 0) for m in runtime),
        "autotune_s": (record["plan"].get("tuning") or {}).get("seconds"),
        "final_loss": [m["loss"] for m in runtime if "loss" in m][-1],
        "eval": {**evaluation, "base_exact_match": metrics["base"]["exact_match"],
                 "run_exact_match": metrics["adapter"]["exact_match"]},
        "samples": [{"prompt": p["prompt"][-1]["content"] if isinstance(p["prompt"], list) else p["prompt"],
                     "base": p["base_prediction"], "run": p["prediction"], "reference": p["reference"]}
                    for p in predictions[:3]],
    }
    print(f"[task] exact match {metrics['base']['exact_match']:.0f}% -> {metrics['adapter']['exact_match']:.0f}%; "
          f"train {train['wall_s']:.0f} s, peak RSS {train['peak_rss_gib']:.2f} GiB", flush=True)

    # 3. the exports
    result["exports"] = []
    for label, extra, base in (("adapter", ["--adapter-only"], f"the original file ({result['gguf']['file_type']})"),
                               ("q8_0", ["--outtype", "q8_0"], "the merged model as q8_0")):
        out = work / f"export-{label}"
        print(f"[export] loraft export RUN --format gguf {' '.join(extra)}", flush=True)
        measured = run_measured(loraft("export", run_dir, "--format", "gguf", *extra, "--out", out), env,
                                work / f"export-{label}.log", args.wait_quiet)
        if not (out / "export_report.json").is_file():
            raise SystemExit(f"loraft export {' '.join(extra)} failed: see {measured['log']}")
        result["exports"].append(export_row(f"loraft export RUN --format gguf {' '.join(extra)}", measured,
                                            out / "export_report.json", base))

    # 4. the tolerance per base type
    folder = gguf_base.hf_folder(str(gguf), weights="fp32")
    bases = make_bases(gguf, folder, work / "bases", work / "bases.log")
    result["quantizer"] = str(llamacpp.find_quantize(None) or "")
    result["types"] = tolerance_per_type(bases, run_dir, work / "export-adapter" / "adapter-f32.gguf", folder,
                                         heldout_path, work / "verify.log")

    result["seconds"] = time.time() - started
    section = markdown(result)
    print("\n" + section)
    if args.json:
        common.write_json(args.json, result)
    if args.docs:
        write_docs(args.docs, section)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[bench] {result['seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
