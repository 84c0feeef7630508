"""Fuzz of `loraft ui`, the real server as a user starts it: every route of docs/ui.md driven with random and hostile
bodies, query strings, headers and configs (hypothesis, derandomized: CI sees the same requests every time).

Asserted: no request gets a 5xx; a GET /api/health sent every 0.2 s beside the fuzz always answers within 1 s; and,
once everything the fuzz launched has ended, no process of the UI (the UI, its worker processes, the runs and jobs it
started) opened or listed a file outside the workspace, the caches and the system's and Python's own folders, and
none opened a canary: tests/open_audit hooks every one of those processes (sys.addaudithook on `open`).

The hostile inputs aim at the files a UI must never read: canary records outside the workspace, reached by absolute
paths, `~`, `$HOME` and another `$VARIABLE`, `..`, a symbolic link to the outside folder and one to the canary file
inside the workspace's data folder, a model and a run directory outside, runs in the workspace whose own config
names the outside, and a run whose files are symbolic links to the canaries. The UI is started with small limits
(10 s per check, one run and one job at a time), so whatever the fuzz starts stays small. Each 5xx is reported with
the request as sent, all of them at the end, with the audit's lines. A last test plants named pipes in the workspace.

LORAFT_UI_FUZZ_EXAMPLES=2000 hunts longer, LORAFT_UI_FUZZ_SEED=N elsewhere (hypothesis, no longer derandomized).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

from conftest import TINY_RUN_YAML, write_alpaca
from loraft.ui.workspace import caches
from run_helpers import ServerProcess

HOOK = Path(__file__).resolve().parent / "open_audit"
EXAMPLES = int(os.environ.get("LORAFT_UI_FUZZ_EXAMPLES", "200"))
SEED = os.environ.get("LORAFT_UI_FUZZ_SEED")  # another seed: other requests (unset: CI's, derandomized)
LIVE = ("starting", "running", "running?")
BIG_NUMBER = "9" * 5000  # past Python's int/str conversion limit (4300 digits)
# placeholders a body or YAML text carries where no JSON or YAML library writes what is meant
BIG = "@@big-number@@"  # a 5,000-digit number, bare
BAD_DATE = "@@bad-date@@"  # a YAML date that does not exist, bare: YAML's timestamp constructor raises ValueError
JOB_ID = "@@job-id@@"  # the id of a job the UI has started, when there is one
BACKTRACKING = r"transformer\.h\.0\.(?:.|.){0,26}Q"  # seconds of re.fullmatch per long module name
SYSTEM_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/run", "/opt")

RUN_YAML = TINY_RUN_YAML.replace("max_steps: 3", "max_steps: 2").replace("save_steps: 2", "save_steps: 1")


# ------------------------------------------------------------------------------------------- the audit hook
def python_roots(environment: dict) -> list[str]:
    """The folders Python itself reads from in a child started with `environment`: its prefixes, the real folder of
    its interpreter and every absolute sys.path entry (PYTHONPATH and .pth entries included; -P: not the cwd)."""
    shown = subprocess.run(
        [sys.executable, "-P", "-c", "import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, "
         "sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable)), *sys.path]))"],
        env={**os.environ, **{key: value for key, value in environment.items() if not key.startswith("OPEN_AUDIT")}},
        capture_output=True, text=True, check=True)
    return [entry for entry in json.loads(shown.stdout) if os.path.isabs(entry)]


def audit_environment(log_dir: Path, allowed: list) -> dict:
    """The environment that makes a Python child (and all it starts) log what it opens outside `allowed`."""
    return {"PYTHONPATH": os.pathsep.join([str(HOOK), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "OPEN_AUDIT_LOG_DIR": str(log_dir), "OPEN_AUDIT_ALLOWED": os.pathsep.join(str(root) for root in allowed)}


def audit_lines(log_dir: Path) -> list[str]:
    return [line for path in sorted(log_dir.glob("*.txt"))
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def audit_report(log_dir: Path, lines: list[str]) -> str:
    """`lines`, then the command line of each process that wrote one."""
    pids = sorted({line.split()[0] for line in lines})
    commands = [f"{pid}: " + ((log_dir / f"{pid}.cmd").read_text(errors="replace") if (log_dir / f"{pid}.cmd").is_file()
                              else "(a forked child)") for pid in pids]
    return "\n".join([*lines[:200], "", "processes:", *commands])


def test_the_audit_hook_logs_what_a_process_opens_outside_the_allowed_roots(tmp_path):
    allowed, outside, logs = tmp_path / "allowed", tmp_path / "outside", tmp_path / "logs"
    for folder in (allowed, outside, logs):
        folder.mkdir()
    (allowed / "inside.txt").write_text("in")
    (outside / "secret.txt").write_text("out")
    (allowed / "link.txt").symlink_to(outside / "secret.txt")
    environment = audit_environment(logs, [])
    environment["OPEN_AUDIT_ALLOWED"] = os.pathsep.join([str(allowed), *python_roots(environment)])
    program = (  # run in `allowed`: a relative path is taken from the working directory
        "import os\n"
        "open('inside.txt').read()\n"
        "open('../outside/secret.txt').read()\n"
        "open('link.txt').read()\n"
        "os.listdir('../outside')\n"
        "try:\n"
        "    open('../outside/missing.txt')\n"  # reading what does not exist reads nothing: not logged
        "except OSError:\n"
        "    pass\n"
        "open('../outside/written.txt', 'w').close()\n"  # a write is logged, though the file did not exist
        "descriptor = os.open('inside.txt', os.O_RDONLY)\n"
        "open(descriptor).close()\n"  # a descriptor is not a path
        "child = os.fork()\n"
        "if child == 0:\n"
        "    open('../outside/secret.txt').close()\n"
        "    os._exit(0)\n"
        "os.waitpid(child, 0)\n"
        "print(os.getpid(), child)\n")
    ran = subprocess.run([sys.executable, "-P", "-c", program], cwd=allowed, env={**os.environ, **environment},
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    parent, child = ran.stdout.split()
    secret = outside / "secret.txt"
    assert audit_lines(logs) == [
        f"{parent} open {secret} (asked: ../outside/secret.txt)",
        f"{parent} open {secret} (asked: link.txt)",
        f"{parent} os.listdir {outside} (asked: ../outside)",
        f"{parent} open {outside / 'written.txt'} (asked: ../outside/written.txt)",
        f"{child} open {secret} (asked: ../outside/secret.txt)",  # a forked child keeps the hook, and says who it is
    ]


# --------------------------------------------------------------------------------------------- the server
@dataclass
class Places:
    workspace: Path
    outside: Path  # a sibling of the workspace: canary data, a model, a run directory
    home: Path  # the UI's $HOME: `~/canary.jsonl` is a real file outside
    audit_logs: Path
    canaries: list = field(default_factory=list)


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_bloom_dir, machine_independent_environment) -> Places:
    top = tmp_path_factory.mktemp("ui-fuzz").resolve()
    workspace, outside, home = top / "workspace", top / "outside", top / "home"
    canaries = [write_alpaca(outside / "canary.jsonl"), write_alpaca(home / "canary.jsonl")]
    shutil.copytree(tiny_bloom_dir, outside / "model")
    (outside / "fakerun").mkdir()
    (outside / "fakerun" / "loraft_run.json").write_text(json.dumps({"status": "finished", "base_model": "base"}))
    (outside / "fakerun" / "config.yaml").write_text(RUN_YAML)
    (outside / "outside.yaml").write_text(RUN_YAML)

    write_alpaca(workspace / "data" / "train.jsonl", repeat=2)
    shutil.copytree(tiny_bloom_dir, workspace / "base")
    (workspace / "configs").mkdir()
    (workspace / "configs" / "run.yaml").write_text(RUN_YAML.replace("max_steps: 2", "max_steps: 1"))
    (workspace / "configs" / "evil.yaml").write_text(RUN_YAML.replace("name_or_path: base", f"name_or_path: "
                                                                      f"{outside / 'model'}").replace(
        "path: data/train.jsonl", "path: ~/canary.jsonl"))
    (workspace / "configs" / "linked.yaml").symlink_to(outside / "outside.yaml")
    (workspace / "escape").symlink_to(outside, target_is_directory=True)
    (workspace / "data" / "leak.jsonl").symlink_to(outside / "canary.jsonl")
    (workspace / "linkrun").symlink_to(outside / "fakerun", target_is_directory=True)
    # folders in the workspace whose files are symbolic links to files outside: a model, a save_to_disk dataset
    from datasets import Dataset

    Dataset.from_list([json.loads(line) for line in canaries[0].read_text().splitlines()]).save_to_disk(
        str(outside / "disk"))
    for folder, source in ((workspace / "base-linked", outside / "model"), (workspace / "data" / "disk-linked",
                                                                           outside / "disk")):
        folder.mkdir()
        for file in source.iterdir():
            (folder / file.name).symlink_to(file)
    # a finished run in the workspace with no tokenizer, whose record names a base model outside
    (workspace / "based-outside").mkdir()
    (workspace / "based-outside" / "loraft_run.json").write_text(json.dumps(
        {"status": "finished", "base_model": str(outside / "model")}))
    logs = machine_independent_environment / f"open-audit-{top.name}"  # a cache: the confined children may write it
    logs.mkdir()
    return Places(workspace, outside, home, logs, canaries)


@pytest.fixture(scope="module")
def ui(places, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(places.home))  # the caches as the UI will place them, under its $HOME
        declared_caches = [str(path) for path in caches()]
    environment = {"HOME": str(places.home), "FUZZ_OUTSIDE": str(places.outside), "OMP_NUM_THREADS": "1",
                   # no network here: an export job stops at once at the converter instead of pip-downloading it
                   "LLAMA_CPP_DIR": str(places.workspace / "no-llama-cpp"),
                   **audit_environment(places.audit_logs, [])}
    allowed = [places.workspace, *declared_caches, *python_roots(environment), *SYSTEM_ROOTS]
    environment["OPEN_AUDIT_ALLOWED"] = os.pathsep.join(str(root) for root in allowed)
    # -P: `python -m` would put the folder the tests run from on sys.path, a folder the UI has no business reading
    server = ServerProcess(
        lambda port: [sys.executable, "-P", "-m", "loraft.cli", "ui", "--workspace", str(places.workspace), "--port",
                      str(port), "--time-limit", "10", "--max-runs", "1", "--max-jobs", "1", "--max-streams", "8"],
        tmp_path_factory.mktemp("ui-fuzz-log") / "ui.log", stop_timeout=30, ready_path="/api/info",
        environment=environment)
    info = httpx.get(server.url + "/api/info", timeout=30).json()
    server.kernel_confinement = info["kernel_confinement"]  # the Landlock ABI, or None: reported, not required
    assert info["caches"] == declared_caches  # what the audit allows is what the UI declares
    yield server
    server.stop()
    stop_launched(places.workspace)


def stop_launched(workspace: Path) -> None:
    """SIGKILL what the UI launched that still runs (each leads a session of its own): a failed test leaves nothing."""
    records = [json.loads(path.read_text()) for path in (workspace / ".loraft-ui" / "jobs").glob("*/job.json")]
    starts = [start for path in (workspace / ".loraft-ui" / "runs").glob("*.json")
              for start in json.loads(path.read_text()).get("starts", [])]
    for pid, argv in [(job["pid"], job["process_argv"]) for job in records] + [(s["pid"], s["argv"]) for s in starts]:
        try:  # the pid may have been recycled: only the process that still runs what was launched
            running = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            if running == [part.encode() for part in argv] and os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        except OSError:  # it has ended
            pass


def wait_until_idle(url: str, timeout: float) -> list[str]:
    """Wait (at most `timeout` s) until no run is starting or running and no job is running; returns what still is."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            runs = httpx.get(url + "/api/runs", timeout=30).json()
            started = httpx.get(url + "/api/jobs", timeout=30).json()
        except httpx.HTTPError as exc:
            return [f"GET /api/runs or /api/jobs got no answer: {exc!r}"]
        busy = [f"run {run['name']} {run['status']}: {run}" for run in runs if run["status"] in LIVE]
        busy += [f"job {job['id']} running: {job}" for job in started if job["status"] == "running"]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.5)


@pytest.fixture(scope="module")
def finished(ui, places) -> str:
    """A run trained through the API (a launched, audited trainer); then the hostile runs beside it."""
    answer = httpx.post(ui.url + "/api/runs", json={"name": "tiny", "config": RUN_YAML}, timeout=60)
    assert answer.status_code == 202, answer.text
    assert wait_until_idle(ui.url, 180) == []
    state = httpx.get(ui.url + "/api/runs/tiny", timeout=30).json()
    assert state["state"]["status"] == "finished", httpx.get(ui.url + "/api/runs/tiny/log", timeout=30).text
    plant_hostile_runs(places, places.workspace / "tiny")
    return "tiny"


def plant_hostile_runs(places: Places, run_dir: Path) -> None:
    """Copies of a finished run that lead outside: `planted` (finished) and `planted-stopped` (resumable) name a
    base model and data outside in their config.yaml; in `linked` the logs, metrics, report and config are symbolic
    links to the canaries and `checkpoints` one to a folder outside. And `loop`, a symbolic link to itself."""
    workspace, outside = places.workspace, places.outside
    for name, status in (("planted", "finished"), ("planted-stopped", "stopped")):
        planted = workspace / name
        shutil.copytree(run_dir, planted)
        config = yaml.safe_load((planted / "config.yaml").read_text())
        config["model"]["name_or_path"] = str(outside / "model")
        config["data"]["path"] = "~/canary.jsonl"
        config["output_dir"] = str(planted)
        (planted / "config.yaml").write_text(yaml.safe_dump(config))
        record = json.loads((planted / "loraft_run.json").read_text())
        (planted / "loraft_run.json").write_text(json.dumps({**record, "status": status}))
    linked = workspace / "linked"
    shutil.copytree(run_dir, linked)
    shutil.move(linked / "checkpoints", outside / "checkpoints")
    (linked / "checkpoints").symlink_to(outside / "checkpoints", target_is_directory=True)
    for name, target in (("train.log", places.canaries[0]), ("console.log", places.canaries[1]),
                         ("metrics.jsonl", places.canaries[0]), ("data_report.json", places.canaries[0]),
                         ("config.yaml", outside / "outside.yaml")):
        (linked / name).unlink()
        (linked / name).symlink_to(target)
    (workspace / "loop").symlink_to(workspace / "loop")


# ------------------------------------------------------------------------------------------------ requests
@dataclass
class Call:
    method: str
    path: str  # percent-encoded, with its query
    headers: dict = field(default_factory=dict)
    body: Optional[bytes] = None
    stream: bool = False
    route: str = ""  # the route it is aimed at, for the statistics

    def __repr__(self) -> str:
        body = self.body if self.body is None or len(self.body) < 600 else self.body[:600] + b"..."
        path = self.path if len(self.path) < 600 else self.path[:600] + "..."
        return f"{self.method} {path} headers={self.headers!r} body={body!r}"


def encode(text: str, safe: str = "/") -> str:
    """`text` percent-encoded for a URL (lone surrogates too: they arrive as the bytes that encode them). With no
    safe character even dots are: a client normalizes a bare `..` segment away, `%2E%2E` reaches the server."""
    encoded = quote(text.encode("utf-8", "surrogatepass"), safe=safe)
    return encoded if safe else encoded.replace(".", "%2E")


def to_json(value) -> bytes:
    text = json.dumps(value)  # NaN and Infinity as Python writes them: not JSON, but a client may send them
    return text.replace(json.dumps(BIG), BIG_NUMBER).replace(BIG, BIG_NUMBER).encode("utf-8", "surrogatepass")


def to_yaml(config: dict) -> str:
    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    for quoted in (f"'{BIG}'", f'"{BIG}"', BIG):
        text = text.replace(quoted, BIG_NUMBER)
    for quoted in (f"'{BAD_DATE}'", f'"{BAD_DATE}"', BAD_DATE):
        text = text.replace(quoted, "2026-02-31")
    return text


def alias_bomb(levels: int) -> str:
    """YAML whose every level names the one before nine times: 9**levels leaves once expanded (the "billion laughs"),
    all in the value of a key the config reads."""
    bombs = ["&x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bombs += [f"&x{level} [{', '.join([f'*x{level - 1}'] * 9)}]" for level in range(1, levels)]
    return "\n".join(["model:", "  name_or_path: base", "adapter:", f"  target_modules: [{', '.join(bombs)}]",
                      "data:", "  path: data/train.jsonl", "train:", "  max_steps: 1", ""])


def strategies(places: Places, run: str):
    """The fuzz's requests: a strategy per route, its bodies mostly a valid request with one or two fields made
    hostile (so requests get past the type checks to the path checks, the workers and the launches), the rest
    anything at all."""
    outside, home = places.outside, places.home
    hostile_paths = [
        str(outside / "canary.jsonl"), str(home / "canary.jsonl"), str(outside), str(outside / "model"),
        str(outside / "fakerun"), str(outside / "outside.yaml"), "~/canary.jsonl", "$HOME/canary.jsonl",
        "${HOME}/canary.jsonl", "${HOME}/x", "$FUZZ_OUTSIDE/canary.jsonl", "${FUZZ_OUTSIDE}/model", "~root/.bashrc",
        "~nobody/x", "escape/canary.jsonl", "escape/model", "escape", "escape/fakerun", "data/leak.jsonl",
        "../outside/canary.jsonl", "data/../../outside/canary.jsonl", "./../outside", "/etc/passwd",
        "/proc/self/environ", "/dev/zero", "/dev/stdin", "/", ".", "..", "data/a\0b", "", " ", "\ud800",
        "a" * 5000, "é/ü", "数据/train.jsonl", "%2e%2e/outside/canary.jsonl", "..%2f..%2fetc%2fpasswd",
        "file:///etc/passwd", "hf://datasets/x", "bigscience/bloom-560m", "gpt2", "C:\\Windows", "\\\\host\\share",
        "data/train.jsonl/", "./data/train.jsonl", "data//train.jsonl", "base/", "data", ".loraft-ui",
        "configs/run.yaml", "configs/linked.yaml", "configs/evil.yaml", ".loraft-ui/runs/tiny.yaml",
        run, f"{run}/config.yaml", f"{run}/checkpoints/checkpoint-1", f"{run}/console.log", "planted", "linkrun",
        "based-outside", "new-cache", "new/nested/folder", "linked/train.log", "base-linked", "data/disk-linked",
        "linked/checkpoints/checkpoint-1", "linked", "loop", "loop/x",
    ]
    parts = st.sampled_from(["..", ".", "escape", "data", "leak.jsonl", "train.jsonl", "base", "canary.jsonl",
                             "%2e%2e", "~", "$HOME", "${HOME}", "$FUZZ_OUTSIDE", run, "checkpoints", "数据", "é",
                             "a" * 300, "\0", "", "outside", ".loraft-ui", "config.yaml", "linkrun"])
    composed = st.builds(lambda lead, items: lead + "/".join(items), st.sampled_from(["", "/", "~/", "./"]),
                         st.lists(parts, min_size=1, max_size=5))
    paths = st.one_of(st.sampled_from(hostile_paths), st.sampled_from(hostile_paths), composed, st.text(max_size=20))
    numbers = st.sampled_from([BIG, f"-{BIG}", 0, 1, 2, -1, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308,
                               float("nan"), float("inf"), True, False, None]) | st.integers(-5, 70)
    texts = st.text(max_size=30) | st.sampled_from(["\ud800", "a" * 5000, "\0", "auto", "alpaca", "chatml"])
    json_values = st.recursive(st.none() | st.booleans() | numbers | texts | paths,
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                               max_leaves=8)
    anything = json_values | paths | numbers

    # --- configs: YAML text whose path keys take hostile values, plus extra keys; or a file / preset name ----------
    target_modules = st.sampled_from([BACKTRACKING, "query_key_value", ["dense"], "(", "all-linear", BIG])
    valid_model = {"name_or_path": st.just("base")}
    valid_data = {"path": st.just("data/train.jsonl"), "max_length": st.just(32)}
    model = st.fixed_dictionaries({"name_or_path": st.just("base") | paths}, optional={
        "adapter_from": paths | st.sampled_from([run, "planted"]), "trust_remote_code": st.booleans()})
    adapter = st.fixed_dictionaries({}, optional={"target_modules": target_modules, "r": numbers})
    data = st.fixed_dictionaries({"path": st.just("data/train.jsonl") | paths}, optional={
        "eval_path": paths, "cache_dir": paths, "max_length": numbers, "format": texts, "template": texts})
    train = st.fixed_dictionaries({}, optional={"seed": st.sampled_from([BAD_DATE, BIG, 7, "x"]),
                                                "learning_rate": numbers, "per_device_train_batch_size": numbers})
    extra_keys = st.dictionaries(st.sampled_from(["output_dir", "overwrite", "generation", "preference", "lora",
                                                  "unknown"]) | texts, anything, max_size=2)

    def yaml_config(model_section, data_section, train_section, extra, adapter_section=None):
        config = {"model": model_section, "data": data_section, **({"adapter": adapter_section} if adapter_section
                                                                    else {}), **extra}
        config["train"] = {**train_section, "max_steps": 1}  # whatever else it holds: one step at most
        return to_yaml(config)

    valid_configs = st.one_of(
        st.builds(yaml_config, st.fixed_dictionaries(valid_model), st.fixed_dictionaries(valid_data),
                  st.just({}), st.just({})),
        st.sampled_from(["configs/run.yaml", "demo", f"{run}/config.yaml"]))
    raw_yaml = st.sampled_from([
        alias_bomb(4), alias_bomb(8), "model: !!python/object/apply:os.system ['true']\n", "model: !!binary AAAA\n",
        "[" * 5000, "{a: 1, a: 2}", "model:\n\tname_or_path: base\n", "%YAML 9.9\n---\nx: 1\n", "---\n...\n---\n",
        "model: {name_or_path: base}\ndata: {path: data/train.jsonl}\ntrain: {max_steps: 1, seed: 2026-02-31}\n",
        "model: &m {name_or_path: base, adapter_from: *m}\n", "? [a, b]\n: c\n", "\ufeffmodel: 1\n", "~", "null",
    ]) | st.text(max_size=60)
    hostile_configs = st.one_of(
        st.builds(yaml_config, model, data, train, extra_keys, adapter),
        st.builds(yaml_config, model, data, train, extra_keys, adapter),
        raw_yaml,
        st.sampled_from(["demo-preference", "qwen2-lora", "configs/evil.yaml", "configs/linked.yaml",
                         "escape/outside.yaml", "../outside/outside.yaml", str(outside / "outside.yaml"), "~/x.yaml",
                         ".loraft-ui/runs/tiny.yaml", "planted/config.yaml", "nope.yaml", "a\0.yaml", "  "]))
    override_values = st.sampled_from([
        "data.path=~/canary.jsonl", "data.path=data/leak.jsonl", "data.path=$FUZZ_OUTSIDE/canary.jsonl",
        "train.seed=2026-02-31", f"adapter.target_modules={BACKTRACKING}", "output_dir=/tmp/elsewhere",
        " output_dir =x", "--resume", "=", "model.name_or_path=escape/model", "model.adapter_from=escape/fakerun",
        "model.adapter_from=planted", f"model.adapter_from={run}", "data.cache_dir=/tmp/cache",
        "data.cache_dir=new-cache", "data.eval_path=$HOME/canary.jsonl", "data.eval_path=data/train.jsonl",
        f"train.max_steps={BIG_NUMBER}", "train.max_steps=-1", "model.trust_remote_code=true", "a.b.c.d=1",
        "train=1", "train.max_steps=1e400", "generation.max_new_tokens=99999999", "overwrite=true",
        "model.name_or_path=gpt2", "model.name_or_path=planted",
    ]) | st.builds("{}={}".format, st.sampled_from(["model.name_or_path", "model.adapter_from", "data.path",
                                                    "data.eval_path", "data.cache_dir", "train.seed", "x"]) | texts,
                   paths | numbers.map(str))
    hostile_overrides = st.lists(override_values, min_size=1, max_size=3).map(lambda items: [*items,
                                                                                            "train.max_steps=1"])

    # --- names, query strings, headers ------------------------------------------------------------------------
    names = st.one_of(st.just(run), st.sampled_from([
        run, "fz-ok", "linked", "loop", "nope", "planted", "planted-stopped", "based-outside", "linkrun",
        "escape/fakerun", "escape", "../outside", "a/b/c", ".loraft-ui", ".hidden", f"{run}/..", f"{run}/checkpoints",
        "data", "base", "demo-data", "ü", "a" * 65, "a" * 5000, "\0", "%2e%2e", "fz.new", "", "/", "//", f"{run}/",
        f" {run}"]), texts)
    new_names = st.integers(0, 10**6).map("fz-{}".format)
    query_values = st.sampled_from([BIG_NUMBER, "-1", "0", "1", "100000", "100001", "1e3", "many", "", "\0", "0x10",
                                    "１２", " 5", "checkpoint-1", "checkpoint-2", "../x", "checkpoint-1/../..",
                                    "checkpoint-" + BIG_NUMBER, "true", "1", "yes", run, "nope", "../outside"]) | texts
    query = st.lists(st.tuples(st.sampled_from(["lines", "run", "checkpoint", "base", "x"]), query_values),
                     max_size=3).map(lambda items: "?" + "&".join(f"{encode(k, '')}={encode(v, '')}"
                                                                  for k, v in items) if items else "")
    # what HTTP lets a header value hold (no control characters, no space at either end): any other byte
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
                          max_size=40).map(str.strip)
    extra_headers = st.one_of(*[st.just({})] * 4, st.dictionaries(
        st.sampled_from(["Origin", "Sec-Fetch-Site", "X-Loraft-Token", "Authorization", "Last-Event-ID", "Host",
                         "Cookie", "Accept"]),
        header_text | st.sampled_from(["same-origin", "cross-site", "http://evil.example", "Bearer x", "9" * 5000]),
        min_size=1, max_size=2))
    content_types = st.sampled_from(["application/json"] * 8 + ["application/json; charset=latin-1", "text/plain",
                                                                "application/x-www-form-urlencoded", "",
                                                                "APPLICATION/JSON", "application/jsonx"])

    def body_of(spec: dict):
        """Bodies for `spec` ({key: (valid, hostile, required)}): mostly a valid body with one or two fields made
        hostile, a key dropped or an unknown one added; sometimes anything, JSON or not."""
        keys = list(spec)
        valid = st.fixed_dictionaries({key: valid for key, (valid, _, required) in spec.items() if required},
                                      optional={key: valid for key, (valid, _, required) in spec.items()
                                                if not required})
        changes = st.lists(st.sampled_from(keys), min_size=1, max_size=2, unique=True).flatmap(
            lambda chosen: st.fixed_dictionaries({key: spec[key][1] for key in chosen}))
        near_valid = st.builds(lambda body, changed: {**body, **changed}, valid, changes)
        retyped = st.builds(lambda body, changed: {**body, **changed}, valid,
                            st.dictionaries(st.sampled_from(keys), anything, min_size=1, max_size=2))
        dropped = st.builds(lambda body, key: {k: v for k, v in body.items() if k != key}, valid, st.sampled_from(keys))
        extra = st.builds(lambda body, added: {**body, **added}, valid, st.dictionaries(texts, anything, min_size=1,
                                                                                        max_size=1))
        junk = st.sampled_from([b"", b"{", b"[1]", b"null", b'"x"', b"\xff\xfe", b"[" * 100_000, b"{}" * 10,
                                b'{"a": ' + BIG_NUMBER.encode() + b"}", b"x" * (1 << 20 | 1)]) | st.binary(max_size=40)
        objects = st.one_of(near_valid, near_valid, near_valid, valid, valid, retyped, dropped, extra)
        return st.one_of(*[objects.map(to_json)] * 8, json_values.map(to_json), junk)

    def post(path: str, spec: dict, bounded=lambda body: body):
        return st.builds(lambda body, content_type, headers: Call("POST", path, {"Content-Type": content_type,
                                                                                 **headers}, body, route=path),
                         body_of(spec).map(bounded), content_types, extra_headers)

    def named(template: str, method: str = "GET", with_query: bool = False, stream: bool = False, spec=None,
              last_event_ids=st.none()):
        def build(name, full, tail, content_type, headers, last_event_id, body):
            headers = {**({"Content-Type": content_type} if body is not None else {}), **headers}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            return Call(method, template.format(name=encode(name, "" if full else "/")) + tail, headers, body, stream,
                        f"{method} {template}")

        bodies = body_of(spec) if spec is not None else st.none()
        if method == "POST" and spec is None:  # stop and resume: no body, an empty one, or junk
            bodies = st.sampled_from([None, b"", b"{}", b'{"force": true}', b"[]"])
        return st.builds(build, names, st.booleans(), query if with_query else st.just(""), content_types,
                         extra_headers, last_event_ids, bodies)

    def one_step_at_most(body: bytes) -> bytes:
        """A start whose config may be a preset (hundreds of steps) or whose overrides may hold anything: given
        `train.max_steps=1` last, so that nothing the fuzz starts trains for long."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return body
        if not isinstance(payload, dict):
            return body
        overrides = payload.get("overrides")
        if isinstance(overrides, list) and overrides[-1:] != ["train.max_steps=1"]:
            payload["overrides"] = [*overrides, "train.max_steps=1"]
        elif overrides is None:
            payload["overrides"] = ["train.max_steps=1"]
        else:
            return body
        return to_json(payload)

    run_fields = {"name": (new_names, names, True), "config": (valid_configs, hostile_configs, True),
                  "overrides": (st.just(["train.max_steps=1"]), hostile_overrides, False)}
    plan_fields = {**run_fields, "name": (new_names, names, False),
                   "config": (valid_configs | st.sampled_from(["qwen2-lora", "demo-preference"]), hostile_configs,
                              True)}
    data_fields = {"path": (st.just("data/train.jsonl"), paths, True), "model": (st.sampled_from(["base", run]), paths,
                                                                                False),
                   "template": (st.sampled_from(["auto", "alpaca", "chatml", "human_assistant"]), texts, False),
                   "format": (st.sampled_from(["auto", "alpaca", "messages"]), texts, False),
                   "max_length": (st.integers(2, 64), numbers, False),
                   "max_prompt_length": (st.integers(1, 32), numbers, False),
                   "max_completion_length": (st.integers(1, 32), numbers, False)}
    preview_fields = {**data_fields, "model": (st.sampled_from(["base", run]), paths, True),
                      "limit": (st.integers(1, 3), numbers, False)}
    job_fields = {"kind": (st.sampled_from(["eval", "merge", "export"]), texts, True),
                  "data": (st.just("data/train.jsonl"), paths, False), "base": (st.booleans(), anything, False),
                  "limit": (st.integers(1, 2), numbers, False),
                  "dtype": (st.sampled_from(["fp32", "bf16"]), texts, False),
                  "outtype": (st.sampled_from(["f16", "q8_0"]), texts, False)}
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                     "content": st.text(max_size=20)})
    chat_fields = {"model": (st.sampled_from([run, f"{run}/base"]), texts, True),
                   "messages": (st.lists(message, max_size=2).map(lambda turns: [*turns, {"role": "user",
                                                                                           "content": "你好"}]),
                                anything, True),
                   "max_tokens": (st.sampled_from([1, 4, 64]), numbers, False),
                   "stream": (st.booleans(), anything, False), "temperature": (st.sampled_from([0, 1]), numbers, False)}
    last_event_ids = st.none() | st.sampled_from(["1", "0-0", "3-ffffffffffffffff", "9" * 5000, "1-" + "f" * 40, "-",
                                                  "a-b", "１", "+2", "1-xyz", "100000000000"]) | header_text
    methods = st.sampled_from(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "GET", "POST"])
    plain_paths = st.sampled_from(["/api/health", "/api/info", "/api/schema", "/api/runs", "/api/jobs", "/api/plan",
                                   "/api/data/check", "/", "/api/nothing", "/static/app.js", "/static/i18n/en.json",
                                   "/static/%2e%2e/%2e%2e/ui/app.py", "/static/.hidden", "/static/" + "a" * 5000,
                                   "/static/%00", "/chat/", "/chat", "/api/", "/api/runs/", "//api//runs"])
    return st.one_of(
        st.builds(lambda method, path, headers: Call(method, path, headers, route=f"{method} {path[:40]}"), methods,
                  plain_paths, extra_headers),
        post("/api/runs", run_fields, one_step_at_most), post("/api/runs", run_fields, one_step_at_most),
        post("/api/plan", plan_fields), post("/api/plan", plan_fields),
        named("/api/runs/{name}"), named("/api/runs/{name}/log", with_query=True),
        named("/api/runs/{name}/events", stream=True, last_event_ids=last_event_ids),
        named("/api/runs/{name}/stop", "POST"), named("/api/runs/{name}/resume", "POST"),
        named("/api/runs/{name}/jobs", "POST", spec=job_fields),
        st.builds(lambda tail: Call("GET", "/api/jobs" + tail, route="GET /api/jobs"), query),
        st.builds(lambda job, tail: Call("GET", f"/api/jobs/{job if job == JOB_ID else encode(job, '')}{tail}",
                                         route="GET /api/jobs/{id}"),
                  st.sampled_from([JOB_ID, JOB_ID, "..", "../runs", "nope", "x" * 5000, "\0", ".", "%2e%2e"]) | texts,
                  query),
        post("/api/data/check", data_fields), post("/api/data/check", data_fields),
        post("/api/data/preview", preview_fields), post("/api/data/preview", preview_fields),
        named("/chat/{name}/v1/models", with_query=True),
        named("/chat/{name}/v1/chat/completions", "POST", with_query=True, spec=chat_fields),
        named("/chat/{name}/", with_query=True), named("/chat/{name}", with_query=True),
    )


def explicit_calls(places: Places, run: str) -> list[Call]:
    """Requests sent on every run of the fuzz, whatever it draws: the nastiest input of each route, and each
    request that once got a 5xx."""
    outside = places.outside
    runnable = "model:\n  name_or_path: base\ndata:\n  path: data/train.jsonl\ntrain:\n  max_steps: 1\n"

    def post(path: str, payload: dict) -> Call:
        return Call("POST", path, {"Content-Type": "application/json"}, to_json(payload), route=path)

    return [
        Call("GET", "/static/" + "a" * 5000, route="GET /static/{long}"),  # a name too long for the file system
        post("/api/runs", {"name": "fz-deep", "config": "[" * 5000}),  # YAML nested past Python's recursion limit
        post("/api/plan", {"config": "[" * 5000}),
        post("/api/plan", {"config": alias_bomb(8)}),
        post("/api/plan", {"config": runnable, "overrides": [
            r"adapter.target_modules=transformer\.h\.0\.(?:.|.){0,40}Q"]}),  # only the time limit stops it
        # a run that starts (with a cache and eval data of its own in the workspace): trained while the fuzz goes on
        post("/api/runs", {"name": "fz-ok", "config": runnable, "overrides": [
            "data.cache_dir=new-cache", "data.eval_path=data/train.jsonl", "train.max_steps=1"]}),
        post("/api/runs", {"name": "fz-date", "config": runnable + "  seed: 2026-02-31\n"}),
        post("/api/runs", {"name": "fz-home", "config": runnable, "overrides": ["data.path=~/canary.jsonl",
                                                                               "train.max_steps=1"]}),
        post("/api/runs", {"name": "fz-leak", "config": runnable.replace("data/train.jsonl", "data/leak.jsonl")}),
        post("/api/runs", {"name": "fz-var", "config": runnable.replace("base", "$FUZZ_OUTSIDE/model")}),
        post("/api/data/check", {"path": "escape/canary.jsonl"}),
        post("/api/data/check", {"path": "data/train.jsonl", "model": "based-outside"}),
        post("/api/data/preview", {"path": "data/train.jsonl", "model": str(outside / "model")}),
        post("/api/data/preview", {"path": "data/train.jsonl", "model": run, "limit": 10**30}),
        Call("GET", f"/api/runs/{run}/log?lines={BIG_NUMBER}", route="GET /api/runs/{name}/log"),
        Call("GET", f"/api/runs/{run}/events", {"Last-Event-ID": "9" * 5000}, stream=True,
             route="GET /api/runs/{name}/events"),
        Call("GET", "/api/runs/escape%2Ffakerun", route="GET /api/runs/{name}"),
        Call("GET", "/api/runs/linkrun", route="GET /api/runs/{name}"),
        Call("GET", "/api/runs/linked", route="GET /api/runs/{name}"),
        Call("GET", "/api/runs/linked/log", route="GET /api/runs/{name}/log"),
        Call("GET", "/api/runs/linked/events", stream=True, route="GET /api/runs/{name}/events"),
        Call("GET", "/api/runs", route="GET /api/runs"),
        Call("GET", "/chat/linked/v1/models?checkpoint=checkpoint-1", route="GET /chat/{name}/v1/models"),
        post("/api/runs/linked/jobs", {"kind": "eval", "data": "data/train.jsonl", "limit": 1}),
        post("/api/data/check", {"path": "loop/x"}),
        post("/api/data/check", {"path": "data/disk-linked"}),
        post("/api/data/preview", {"path": "data/train.jsonl", "model": "base-linked"}),
        post("/api/plan", {"config": runnable.replace("data/train.jsonl", "data/disk-linked")}),
        post("/api/plan", {"config": runnable.replace("base", "base-linked")}),
        Call("GET", "/api/runs/loop", route="GET /api/runs/{name}"),
        post("/api/runs/planted-stopped/resume", {}),
        post("/api/runs/planted/jobs", {"kind": "eval", "data": "data/train.jsonl"}),
        post(f"/api/runs/{run}/jobs", {"kind": "eval", "data": "data/leak.jsonl"}),
        post(f"/api/runs/{run}/jobs", {"kind": "export"}),  # stops at the converter ($LLAMA_CPP_DIR)
        Call("GET", f"/api/jobs/{JOB_ID}?lines=1", route="GET /api/jobs/{id}"),
        Call("GET", "/api/jobs/%2E%2E", route="GET /api/jobs/{id}"),
        Call("GET", "/chat/planted/v1/models", route="GET /chat/{name}/v1/models"),
        Call("GET", f"/chat/{run}/v1/models?checkpoint=checkpoint-1", route="GET /chat/{name}/v1/models"),
        post(f"/chat/{run}/v1/chat/completions", {"model": run, "messages": [{"role": "user", "content": "你好"}],
                                                   "max_tokens": 4}),
        post("/api/runs/fz-ok/stop", {}), post("/api/runs/fz-ok/resume", {}),  # whatever state it has reached
    ]


def header_bytes(value: str) -> bytes:
    """A header value as sent: any byte a header may hold (latin-1), else UTF-8's bytes."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def send(client: httpx.Client, call: Call) -> tuple[int, str]:
    """The status and the start of the text of `call`'s answer (599: no answer; 598: a stream broken off); a stream
    is read for a moment, then closed."""
    path = call.path
    if JOB_ID in path:
        started = client.get("/api/jobs").json()
        path = path.replace(JOB_ID, started[-1]["id"] if started else "nope")
    headers = {name: header_bytes(value) for name, value in call.headers.items()}
    # a stream is read for a moment only: a short read timeout
    timeout = httpx.Timeout(30, read=1) if call.stream else httpx.Timeout(30)
    request = client.build_request(call.method, path, headers=headers, content=call.body, timeout=timeout)
    try:
        try:
            response = client.send(request, stream=call.stream)
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # uvicorn closes the kept-alive connection after an unhandled exception (a 5xx already reported):
            # the next request on it fails before the server sees it, so it is sent once more on a new one
            response = client.send(request, stream=call.stream)
    except httpx.HTTPError as exc:  # no answer within 30 s, or the connection dropped again: as bad as a 5xx
        return 599, f"no answer: {exc!r}"
    if not call.stream:
        return response.status_code, response.text[:3000]
    try:
        if response.status_code != 200:
            return response.status_code, response.read()[:3000].decode("utf-8", "replace")
        deadline = time.monotonic() + 1.0
        try:
            for _ in response.iter_raw():
                if time.monotonic() > deadline:
                    break
        except httpx.ReadTimeout:  # a live stream with nothing to send yet
            pass
        except httpx.HTTPError as exc:  # the server broke the stream off: an error after its 200
            return 598, f"the stream broke: {exc!r}"
        return response.status_code, ""
    finally:
        response.close()


class HealthWatch:
    """GET /api/health every `interval` s in a thread while the fuzz runs: the slowest answer and every failure."""

    def __init__(self, url: str, interval: float = 0.2):
        self.url, self.interval = url, interval
        self.slowest, self.failures, self.count = 0.0, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="health-watch", daemon=True)

    def _watch(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.wait(self.interval):
                began = time.monotonic()
                try:
                    response = client.get("/api/health")
                    if response.status_code != 200 or response.json() != {"ok": True}:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - began)
                self.count += 1

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_hostile_requests_get_no_5xx_leave_health_answering_and_open_nothing_outside(ui, finished, places,
                                                                                     record_property):
    statuses: dict[str, Counter] = {}
    server_errors: list[str] = []  # every one, not only the first: one run of the fuzz reports them all
    client = httpx.Client(base_url=ui.url, follow_redirects=False)

    def send_one(call: Call) -> None:
        if sum("-> 599" in failure for failure in server_errors) >= 3:  # the UI hangs: the rest would only wait
            return
        status, text = send(client, call)
        statuses.setdefault(call.route, Counter())[status] += 1
        if status >= 500:
            server_errors.append(f"{call!r}\n-> {status} {text}")

    for call in reversed(explicit_calls(places, finished)):  # the last applied is sent first
        send_one = example(call=call)(send_one)
    send_one = given(call=strategies(places, finished))(send_one)
    send_one = seed(int(SEED or 0))(send_one)
    send_one = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
                        phases=[Phase.explicit, Phase.generate],  # nothing to shrink: 5xx requests are reported as sent
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                               HealthCheck.large_base_example, HealthCheck.filter_too_much])(send_one)

    began = time.monotonic()
    try:
        with HealthWatch(ui.url) as health:
            send_one()
    finally:
        client.close()
    fuzzed = time.monotonic() - began
    busy = wait_until_idle(ui.url, 120)
    record_property("kernel_confinement", ui.kernel_confinement)
    print(f"loraft ui (kernel_confinement {ui.kernel_confinement}): {EXAMPLES} random requests and the explicit ones "
          f"in {fuzzed:.1f} s, +{time.monotonic() - began - fuzzed:.1f} s until what they started ended; health asked "
          f"{health.count} times, slowest {health.slowest:.3f} s; still running: {busy}")
    for route, counted in sorted(statuses.items()):
        print(f"  {route}: {dict(sorted(counted.items()))}")
    # every kind of failure in one report: a fix for one should not hide the next
    problems = []
    if server_errors:
        problems += [f"{len(server_errors)} requests got a 5xx or no answer:", *server_errors]
    if busy:
        problems += ["what the fuzz started did not end within 120 s, or the UI did not say:", *busy]
    if health.failures or not health.count:
        problems += [f"GET /api/health failed ({health.count} asked):", *health.failures[:20]]
    if health.slowest >= 1.0:
        problems.append(f"GET /api/health took {health.slowest:.2f} s during the fuzz")
    commands = [path.read_text(errors="replace") for path in places.audit_logs.glob("*.cmd")]
    for kind in ("loraft.cli ui", "multiprocessing", "loraft.cli train", "loraft.ui.jobs"):
        if not any(kind in command for command in commands):  # an audit that saw nothing would pass
            problems.append(f"no process running {kind!r} loaded the audit hook: {commands}")
    lines = audit_lines(places.audit_logs)
    canary_lines = [line for line in lines if any(str(canary) in line for canary in places.canaries)]
    if canary_lines:
        problems += ["a canary was opened:", audit_report(places.audit_logs, canary_lines)]
    if lines:
        problems += ["opened or listed outside the workspace, the caches and the system's and Python's folders:",
                     audit_report(places.audit_logs, lines)]
    assert not problems, "\n".join(problems)


def test_named_pipes_in_the_workspace_hang_no_request(ui, finished, places):
    """A run whose files are named pipes nobody writes to, and a data file that is one: opening one for reading
    waits for a writer forever, so a UI that opens it in a request's thread never answers, and each such request
    holds one of its threads for good. Every request must still answer (a finished run's stream must end)."""
    piped = places.workspace / "piped"
    shutil.copytree(places.workspace / finished, piped)
    pipes = [piped / name for name in ("train.log", "console.log", "metrics.jsonl", "data_report.json", "config.yaml")]
    pipes.append(places.workspace / "data" / "pipe.jsonl")
    for pipe in pipes:
        pipe.unlink(missing_ok=True)
        os.mkfifo(pipe)
    calls = [("GET", "/api/runs/piped", None), ("GET", "/api/runs/piped/log", None),
             ("GET", "/api/runs/piped/events", None), ("GET", "/api/runs", None),
             ("GET", "/chat/piped/v1/models", None), ("POST", "/api/runs/piped/jobs", {"kind": "merge"}),
             ("POST", "/api/runs/piped/resume", {}), ("POST", "/api/plan", {"config": "piped/config.yaml"}),
             ("POST", "/api/data/check", {"path": "data/pipe.jsonl"}),
             ("POST", "/api/data/preview", {"path": "data/pipe.jsonl", "model": "base"})]
    hung = []
    try:
        with httpx.Client(base_url=ui.url, timeout=10) as client:
            for method, path, body in calls:
                try:
                    answer = client.request(method, path, json=body)  # a stream that ends is read to its end
                    if answer.status_code >= 500:
                        hung.append(f"{method} {path} {body or ''} -> {answer.status_code} {answer.text}")
                except httpx.HTTPError as exc:
                    hung.append(f"{method} {path} {body or ''} -> no answer in 10 s ({exc!r})")
    finally:
        for pipe in pipes:  # a writer that opens and closes wakes every reader still waiting, with end of file
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waits
                pass
    assert hung == [], "\n".join(hung)
