"""Where the test suite's CPU time goes: the README's test command run once while /proc is read every 0.25 s.

    python benchmarks/suite_cpu.py [--json PATH] [-- PYTEST ARGS...]

The pytest process and every process below it (the pytest workers, what they start, and so on) is sorted into a
kind by its command line: the workers themselves (the in-process tests), `loraft train` processes, the UI's servers
and its worker processes, other loraft commands, llama.cpp's converters, Chromium, pytest itself, and the rest.
A process is the suite's when its parent was (or when its command line or working directory is under pytest's
temporary root: a run the UI started outlives the UI, and its parent is then init). Its CPU seconds (user + system)
are the last reading before it ended, so a process that lives less than 0.25 s is missed and one read just before
it ended loses its last quarter second at most.

The machine's whole CPU time over the same wall time (/proc/stat) is printed beside it: the suite's share of it
says how much room more parallelism could find (none on a saturated machine), and what the kernel and the rest of
the machine took meanwhile.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
KINDS = (  # (kind, pattern of the command line), the first that matches
    ("pytest worker (in-process tests)", r"exec\(eval\(sys\.stdin"),
    ("loraft train", r"loraft\.cli\S* train |loraft train |torch\.distributed\.run|torchrun"),
    ("UI server", r"loraft\.cli\S* ui "),
    ("UI worker (a multiprocessing spawn)", r"multiprocessing\.spawn"),
    ("UI job wrapper", r"loraft/ui/jobs\.py"),
    ("other loraft command", r"loraft\.cli|loraft/cli/__main__|from loraft"),
    ("llama.cpp converter", r"convert_(hf|lora)_to_gguf"),
    ("Chromium", r"chrom"),
    ("pip and the wheel build", r"\bpip\b|pyproject_hooks"),
    ("pytest (collection, scheduling)", r"-m pytest"),
)


def kind_of(command: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, command)), "other")


def read_process(pid: str) -> tuple:
    """(parent pid, start tick, CPU seconds) of `pid`; raises OSError when it is gone."""
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
        stat = handle.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu_seconds() -> float:
    with open("/proc/stat", encoding="utf-8") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK  # all but idle and iowait


def census(command: list[str], temporary_root: str) -> dict:
    """Run `command`, read /proc until it ends; returns the processes seen and the wall and machine CPU seconds."""
    started, machine_before = time.monotonic(), machine_cpu_seconds()
    suite = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(suite.stdout), daemon=True)
    reader.start()
    ours, seen = {suite.pid}, {}  # the suite's pids; (pid, start tick) -> [command, cpu, kind]
    while suite.poll() is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                parent, start, cpu = read_process(pid)
                key = (int(pid), start)
                if key not in seen:
                    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                        errors="replace").strip()
                    working = os.readlink(f"/proc/{pid}/cwd")
                    if not command_line:  # a kernel thread, or a process between fork and exec: looked at again
                        continue
                    if (int(pid) != suite.pid and parent not in ours
                            and temporary_root not in command_line + " " + working):
                        continue
                    ours.add(int(pid))
                    seen[key] = [command_line, cpu, kind_of(command_line)]
                else:
                    seen[key][1] = cpu
            except OSError:
                continue
        time.sleep(0.25)
    reader.join()
    return {"wall_s": time.monotonic() - started, "machine_cpu_s": machine_cpu_seconds() - machine_before,
            "processes": list(seen.values()), "tail": "".join(output[-3:]).strip(), "exit": suite.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (a file, -k ...)")
    args = parser.parse_args()
    temporary_root = str(Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}")  # pytest's own root
    measured = census([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args.pytest_args],
                      temporary_root)
    by_kind, count = Counter(), Counter()
    for _, cpu, kind in measured["processes"]:
        by_kind[kind] += cpu
        count[kind] += 1
    suite_cpu = sum(by_kind.values())
    cores = len(os.sched_getaffinity(0))
    print(f"{measured['tail']}\nwall {measured['wall_s']:.0f} s on {cores} CPUs; the suite's processes used "
          f"{suite_cpu:.0f} CPU seconds ({suite_cpu / measured['wall_s'] / cores:.0%} of the CPUs), the whole machine "
          f"{measured['machine_cpu_s']:.0f} ({measured['machine_cpu_s'] / measured['wall_s'] / cores:.0%})")
    print(f"{'CPU s':>7} {'share':>6} {'procs':>5} {'s/proc':>6}  kind")
    for kind, cpu in by_kind.most_common():
        print(f"{cpu:7.0f} {cpu / suite_cpu:6.0%} {count[kind]:5d} {cpu / count[kind]:6.1f}  {kind}")
    if args.json:
        common.write_json(Path(args.json), {
            "machine": common.machine(), "command": ["python", "-m", "pytest", "-p", "no:cacheprovider", "-q",
                                                     *args.pytest_args],
            "wall_s": round(measured["wall_s"], 1), "suite_cpu_s": round(suite_cpu, 1),
            "machine_cpu_s": round(measured["machine_cpu_s"], 1), "cpus": cores, "result": measured["tail"],
            "by_kind": {kind: {"cpu_s": round(cpu, 1), "processes": count[kind]} for kind, cpu in
                        by_kind.most_common()},
            "processes": sorted(([round(cpu, 1), kind, command[:300]] for command, cpu, kind in
                                 measured["processes"]), reverse=True)})
    sys.exit(measured["exit"])


if __name__ == "__main__":
    main()
