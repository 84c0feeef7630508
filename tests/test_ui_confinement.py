"""`loraft ui`'s confinement, one test per class of hole a review found (issue 24), each written as the class:

1. a preset's (or file's, or pasted config's) own path keys, replaced by an override, escape;
2. `~` and `$VARIABLES` escape;
3. one request (a backtracking target pattern) freezes the whole UI;
4. names resolve against the UI's working directory;
5. a resume runs what the run's config.yaml says, unchecked;
6. malformed numbers are 500s;
7. one unreadable or outside run empties the run list;
plus the caps (429) and the kernel's confinement of what the UI launches (a symlink swapped after the check).

Refusals assert their status and exact sentence. Most tests use an in-process client; the freeze and the symlink swap
need a real `loraft ui` process (its worker processes, its Landlock domain).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import TINY_RUN_YAML, write_alpaca
from loraft import landlock
from loraft.presets import preset_names
from loraft.ui.app import create_app
from loraft.ui.requests import UISettings
from loraft.ui.work import Workers
from loraft.ui.workspace import PATH_KEYS
from run_helpers import ServerProcess

RUN_YAML = TINY_RUN_YAML.replace("max_steps: 3", "max_steps: 2").replace("save_steps: 2", "save_steps: 1")
# a pattern whose match backtracks 2^30 times on a long module name of BLOOM's first layer (half a minute each on a
# 2-core Xeon: past the time limit)
BACKTRACKING = r"transformer\.h\.0\.(?:.|.){0,30}Q"


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_bloom_dir) -> dict:
    """A workspace (data, the tiny BLOOM as base/, a config), and outside it a fake home and a folder with canary
    data, a model and a finished run; `escape` in the workspace links to the outside folder."""
    root = tmp_path_factory.mktemp("confinement")
    workspace, outside, home = root / "workspace", root / "outside", root / "home"
    write_alpaca(workspace / "data" / "train.jsonl", repeat=2)
    shutil.copytree(tiny_bloom_dir, workspace / "base")
    (workspace / "configs").mkdir()
    (workspace / "configs" / "run.yaml").write_text(RUN_YAML, encoding="utf-8")
    write_alpaca(outside / "canary.jsonl", [{"instruction": "canary", "input": "", "output": "CANARY"}])
    shutil.copytree(tiny_bloom_dir, outside / "model")
    outside_run = outside / "run"
    outside_run.mkdir()
    (outside_run / "loraft_run.json").write_text(json.dumps({"status": "finished"}))
    write_alpaca(home / "canary.jsonl", [{"instruction": "canary", "input": "", "output": "CANARY"}])
    (workspace / "escape").symlink_to(outside, target_is_directory=True)
    return {"workspace": workspace.resolve(), "outside": outside.resolve(), "home": home.resolve()}


@pytest.fixture(scope="module")
def client(places):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(places["home"]))  # `~` is the fake home, whose canary is outside the workspace
        with TestClient(create_app(places["workspace"], UISettings(time_limit=20)),
                        base_url="http://127.0.0.1") as opened:
            yield opened


def assert_refused(response, status: int, sentence: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": sentence}


def escapes(places: dict) -> dict:
    """Each way out of the workspace, and how the refusal names it: {value: (sentence after the key)}."""
    workspace, outside, home = places["workspace"], places["outside"], places["home"]
    return {
        str(outside / "canary.jsonl"): f"{str(outside / 'canary.jsonl')!r} is outside the workspace {workspace}; "
                                       "give a path inside it",
        "~/canary.jsonl": f"'~/canary.jsonl' ({home / 'canary.jsonl'}) is outside the workspace {workspace}; give a "
                          "path inside it",
        "$HOME/canary.jsonl": f"'$HOME/canary.jsonl' ({home / 'canary.jsonl'}) is outside the workspace "
                              f"{workspace}; give a path inside it",
        "escape/canary.jsonl": "'escape/canary.jsonl' leads outside the workspace through a symbolic link",
        "data/../../outside/canary.jsonl": "'data/../../outside/canary.jsonl' climbs out with '..'; give a path "
                                           "inside the workspace",
    }


# the keys a config may set; output_dir is the UI's own (WORKSPACE/NAME), refused as an override
CONFIG_KEYS = [key for key in PATH_KEYS if key != "output_dir"]


def _with_valid_paths(key: str) -> list[str]:
    """Overrides that make every other path key valid, so the refusal is the key under test's."""
    valid = {"model.name_or_path": "base", "data.path": "data/train.jsonl"}
    return [f"{other}={value}" for other, value in valid.items() if other != key]


# ------------------------------------------------------------------------------ 1. and 2.: keys and `~`
@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_no_presets_key_leads_outside_after_an_override(client, places, preset, key):
    """Every preset's path keys, each replaced by an override that leads outside, are refused naming the key: the
    UI checks the config it would launch, after every override, whoever set the key first."""
    value = str(places["outside"] / "canary.jsonl")
    answer = client.post("/api/plan", json={"config": preset, "overrides": [*_with_valid_paths(key),
                                                                            f"{key}={value}"]})
    assert_refused(answer, 400, f"{key} {escapes(places)[value]}")


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_every_way_out_is_refused_in_every_kind_of_config(client, places, key):
    """Absolute paths, `~`, `$HOME`, a symbolic link and `..`, in a preset's override, a workspace file's override
    and pasted YAML, for a plan and for a start (which then starts nothing)."""
    workspace = places["workspace"]
    for value, refusal in escapes(places).items():
        sentence = f"{key} {refusal}"
        overrides = [*_with_valid_paths(key), f"{key}={value}"]
        for source in ("demo", "configs/run.yaml"):
            assert_refused(client.post("/api/plan", json={"config": source, "overrides": overrides}), 400, sentence)
        section, field = key.split(".")
        pasted = RUN_YAML.replace(f"{section}:\n", f"{section}:\n  {field}: {json.dumps(value)}\n", 1)
        if key == "model.name_or_path":
            pasted = pasted.replace("  name_or_path: base\n", "")
        elif key == "data.path":
            pasted = pasted.replace("  path: data/train.jsonl\n", "")
        assert_refused(client.post("/api/plan", json={"config": pasted}), 400, sentence)
        assert_refused(client.post("/api/runs", json={"name": "escaped", "config": "demo", "overrides": overrides}),
                       400, sentence)
        assert not (workspace / "escaped").exists()
        assert not (workspace / ".loraft-ui" / "runs" / "escaped.json").exists()


def test_request_paths_and_names_are_placed_the_same_way(client, places):
    """The data page's file and tokenizer, and an eval job's data, go through the same placement as a config."""
    for value, refusal in escapes(places).items():
        assert_refused(client.post("/api/data/check", json={"path": value}), 400, f"path {refusal}")
        model = value.replace("canary.jsonl", "model")
        model_refusal = refusal.replace("canary.jsonl", "model")
        assert_refused(client.post("/api/data/preview", json={"path": "data/train.jsonl", "model": model}), 400,
                       f"model {model_refusal}")


def test_a_folder_in_the_workspace_whose_files_lead_outside_is_refused(client, places):
    """A model folder and a save_to_disk dataset in the workspace whose files are links to files outside: the folder
    itself is inside, what is read from it is not."""
    workspace, outside = places["workspace"], places["outside"]
    linked = workspace / "linked-model"
    linked.mkdir()
    for file in (outside / "model").iterdir():
        (linked / file.name).symlink_to(file)
    try:
        assert_refused(client.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "linked-model"}),
                       400, "model 'linked-model': config.json leads outside the workspace through a symbolic link")
        assert_refused(client.post("/api/plan", json={"config": "configs/run.yaml",
                                                      "overrides": ["model.name_or_path=linked-model"]}), 400,
                       "model.name_or_path 'linked-model': config.json leads outside the workspace through a symbolic "
                       "link")
        assert_refused(client.post("/api/data/check", json={"path": "linked-model"}), 400,
                       "path 'linked-model': config.json leads outside the workspace through a symbolic link")
    finally:
        shutil.rmtree(linked)


# --------------------------------------------------------------------------- 4.: the working directory
def test_names_never_resolve_against_the_uis_working_directory(places, tiny_bloom_dir, tmp_path, monkeypatch):
    """A model folder and a data file beside where the UI was started are not the workspace's: refused where hubs
    are off, and where hubs are on the name is a hub id (looked up offline, failing), never the local folder."""
    shutil.copytree(tiny_bloom_dir, tmp_path / "cwdmodel")
    write_alpaca(tmp_path / "cwddata.jsonl")
    monkeypatch.chdir(tmp_path)
    workspace = places["workspace"]
    with TestClient(create_app(workspace), base_url="http://127.0.0.1") as ui:
        assert_refused(ui.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "cwdmodel"}), 400,
                       f"model 'cwdmodel' is not in the workspace {workspace}, and this UI does not download from a "
                       "hub; put the files in the workspace, or start loraft ui with --allow-hub")
        assert_refused(ui.post("/api/data/check", json={"path": "cwddata.jsonl"}), 400,
                       f"path 'cwddata.jsonl' does not exist in the workspace {workspace}")
        assert_refused(ui.post("/api/plan", json={"config": "configs/run.yaml",
                                                  "overrides": ["model.name_or_path=cwdmodel"]}), 400,
                       f"model.name_or_path 'cwdmodel' is not in the workspace {workspace}, and this UI does not "
                       "download from a hub; put the files in the workspace, or start loraft ui with --allow-hub")
    with TestClient(create_app(workspace, UISettings(allow_hub=True)), base_url="http://127.0.0.1") as ui:
        for answer in (ui.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "cwdmodel"}),
                       ui.post("/api/plan", json={"config": "configs/run.yaml",
                                                  "overrides": ["model.name_or_path=cwdmodel"]})):
            assert answer.status_code == 400, answer.text  # the hub is offline: the cwd's folder was not loaded
            assert "cwdmodel" in answer.json()["error"]


# ------------------------------------------------------------------------------------------ 5.: resume
def _stopped_run(workspace: Path, name: str, config: str) -> Path:
    run_dir = workspace / name
    (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (run_dir / "loraft_run.json").write_text(json.dumps({"status": "stopped", "global_step": 1}))
    (run_dir / "config.yaml").write_text(config, encoding="utf-8")
    return run_dir


def test_a_resume_is_checked_as_a_start_is(client, places):
    """A stopped run whose config.yaml asks for model code, reads outside, or names another run's directory is
    refused, and nothing is launched: the resume runs only what the UI loaded and checked."""
    workspace = places["workspace"]
    cases = {
        "remote-code": (RUN_YAML.replace("  name_or_path: base\n", "  name_or_path: base\n  trust_remote_code: "
                                                                     "true\n"),
                        "model.trust_remote_code: the UI does not run code shipped with a model; train such a model "
                        "with `loraft train` on the command line"),
        "function-reward": (RUN_YAML + "grpo:\n  rewards: [{type: function, function: 'canary:reward'}]\n",
                            "grpo.rewards.0: the UI offers the built-in rewards only and never imports code a "
                            "request names (canary:reward); train with a function reward with `loraft train` on the "
                            "command line"),
        "home-data": (RUN_YAML.replace("path: data/train.jsonl", "path: ~/canary.jsonl"),
                      f"data.path '~/canary.jsonl' ({places['home'] / 'canary.jsonl'}) is outside the workspace "
                      f"{workspace}; give a path inside it"),
        "linked-model": (RUN_YAML.replace("name_or_path: base", "name_or_path: escape/model"),
                         "model.name_or_path 'escape/model' leads outside the workspace through a symbolic link"),
        "other-run": (RUN_YAML + f"output_dir: {workspace / 'another'}\n",
                      f"run 'other-run': its config.yaml names another output_dir ({workspace / 'another'}); resume "
                      "it with `loraft train` on the command line"),
    }
    for name, (config, sentence) in cases.items():
        if name != "other-run":
            config += f"output_dir: {workspace / name}\n"
        run_dir = _stopped_run(workspace, name, config)
        try:
            assert_refused(client.post(f"/api/runs/{name}/resume"), 400, sentence)
            assert not (workspace / ".loraft-ui" / "runs" / f"{name}.json").exists()
            assert not (run_dir / "console.log").exists()
        finally:
            shutil.rmtree(run_dir)


# ---------------------------------------------------------------------------------------- 6.: numbers
def test_malformed_numbers_are_400s_on_every_route_that_reads_one(client, places):
    workspace = places["workspace"]
    digits = "9" * 5000
    run_dir = workspace / "numbers"
    run_dir.mkdir()
    (run_dir / "loraft_run.json").write_text(json.dumps({"status": "finished"}))
    try:
        assert_refused(client.get(f"/api/runs/numbers/log?lines={digits}"), 400,
                       f"lines must be a whole number from 1 to 100000 (got {'9' * 40 + '...'!r})")
        assert_refused(client.get(f"/api/jobs/20250101-000000-merge-abcd?lines={digits}"), 400,
                       f"lines must be a whole number from 1 to 100000 (got {'9' * 40 + '...'!r})")
        assert_refused(client.get("/api/runs/numbers/events", headers={"Last-Event-ID": digits}), 400,
                       f"Last-Event-ID must be an id this stream sent, LINE-FILE (got {'9' * 40 + '...'!r})")
        assert_refused(client.get("/api/runs/numbers/events", headers={"Last-Event-ID": "1-" + "f" * 5000}), 400,
                       f"Last-Event-ID must be an id this stream sent, LINE-FILE (got {'1-' + 'f' * 38 + '...'!r})")
    finally:
        shutil.rmtree(run_dir)
    # a date where a number belongs, in pasted YAML and in an override; a number too long to read
    assert_refused(client.post("/api/plan", json={"config": RUN_YAML + "x: 2026-02-31\n"}), 400,
                   "config with overrides: unknown config key x")
    assert_refused(client.post("/api/plan", json={"config": "configs/run.yaml",
                                                  "overrides": ["train.seed=2026-02-31"]}), 400,
                   f"{workspace / 'configs' / 'run.yaml'} with overrides: train.seed input should be a valid integer, "
                   "unable to parse string as an integer")
    assert_refused(client.post("/api/plan", json={"config": RUN_YAML.replace("max_steps: 2", f"max_steps: {digits}")}),
                   400, "config: line 7 is not valid YAML (a number too long to read)")
    assert_refused(client.post("/api/plan", json={"config": "configs/run.yaml",
                                                  "overrides": [f"train.seed={digits}"]}), 400,
                   f"{workspace / 'configs' / 'run.yaml'} with overrides: train.seed unable to parse input string as "
                   "an integer, exceeded maximum size")
    for route, body in (("/api/data/check", '{"path": "data/train.jsonl", "max_length": %s}'),
                        ("/api/data/preview", '{"path": "data/train.jsonl", "model": "base", "limit": %s}'),
                        ("/api/runs/x/jobs", '{"kind": "eval", "data": "data/train.jsonl", "limit": %s}')):
        assert_refused(client.post(route, content=(body % digits).encode(), headers={"Content-Type":
                                                                                       "application/json"}),
                       400, "We could not parse the JSON body of your request: it is not valid JSON.")


# ------------------------------------------------------------------------------------------ 7.: the list
def test_one_unreadable_or_outside_run_never_empties_the_list(client, places):
    """A folder linked from outside is not searched (nothing outside is read); a run the UI cannot name or read is
    listed `unreadable` with its sentence; the other runs are listed as ever."""
    workspace = places["workspace"]
    good = workspace / "good"
    good.mkdir()
    (good / "loraft_run.json").write_text(json.dumps({"status": "finished", "global_step": 3}))
    odd = workspace / "odd name"  # `loraft runs` lists it; the UI cannot address it
    odd.mkdir()
    (odd / "loraft_run.json").write_text(json.dumps({"status": "finished"}))
    cut = workspace / "cut"
    cut.mkdir()
    (cut / "loraft_run.json").write_text('{"status": "runn')
    (workspace / "linked-run").symlink_to(places["outside"] / "run", target_is_directory=True)
    try:
        answer = client.get("/api/runs")
        assert answer.status_code == 200, answer.text
        listed = {run["name"]: run for run in answer.json()}
        assert "escape/run" not in listed and "linked-run" not in listed
        assert listed["good"]["status"] == "finished" and listed["good"]["step"] == 3
        assert listed["cut"]["status"] == "unreadable"
        assert listed["odd name"]["status"] == "unreadable"
        assert listed["odd name"]["error"] == ("'odd name' is not a run name: one or two folder names of letters, "
                                               "digits, '.', '_' and '-'")
        assert_refused(client.get("/api/runs/linked-run"), 400,
                       "run 'linked-run' leads outside the workspace through a symbolic link")
    finally:
        for path in (good, odd, cut):
            shutil.rmtree(path)
        (workspace / "linked-run").unlink()


# -------------------------------------------------------------------------------------------- the caps
def test_each_cap_is_a_429_with_one_sentence(places):
    workspace = places["workspace"]
    run_dir = workspace / "capped"
    run_dir.mkdir()
    (run_dir / "loraft_run.json").write_text(json.dumps({"status": "finished"}))
    settings = UISettings(max_runs=0, max_jobs=0, max_streams=0, max_chat_loads=0)
    try:
        with TestClient(create_app(workspace, settings), base_url="http://127.0.0.1") as ui:
            assert_refused(ui.post("/api/runs", json={"name": "new", "config": "configs/run.yaml"}), 429,
                           "this UI does not start runs (loraft ui --max-runs 0)")
            assert not (workspace / "new").exists()
            assert_refused(ui.get("/api/runs/capped/events"), 429,
                           "0 event streams are open, this UI's limit; close a page that follows a run")
            assert_refused(ui.get("/chat/capped/v1/models"), 429,
                           "0 models are loading for chat already (the UI loads at most 0 base models at once); try "
                           "again when they are loaded")
    finally:
        shutil.rmtree(run_dir)


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_workers_queue_to_a_limit_and_a_stuck_one_is_replaced(tmp_path):
    workers = Workers(tmp_path, processes=1, time_limit=2, max_waiting=0)
    try:
        assert workers.run("a nap", _sleep, 0) == 0  # the first call starts the worker
        busy = threading.Thread(target=workers.run, args=("a nap", _sleep, 1.0))
        busy.start()
        time.sleep(0.3)
        with pytest.raises(Exception) as refused:
            workers.run("a nap", _sleep, 0)
        assert (refused.value.status, refused.value.message) == (
            429, "the UI is busy: 1 plans, checks and previews are running or waiting; try again in a moment")
        busy.join()
        with pytest.raises(Exception) as stopped:
            workers.run("the plan", _sleep, 60)
        assert (stopped.value.status, stopped.value.message) == (
            400, "the plan took longer than 2 s and was stopped (loraft ui --time-limit): a target pattern that "
                 "backtracks, or more data than this machine checks in that time?")
        assert workers.run("a nap", _sleep, 0.1) == 0.1  # a fresh worker took the killed one's place
        assert workers.run("the cwd", os.getcwd) == str(tmp_path)  # a worker works in the workspace
    finally:
        workers.close()


# ----------------------------------------------------------------------------- 3. and the real process
# the real UI's --time-limit: what a backtracking pattern costs, and room enough for a legitimate check in a fresh
# worker (its first plan imports the trainer's libraries: 3.6 s on a 2-core Xeon alone, 14 s beside two busy
# processes) while other test files run beside this one (pytest-xdist)
TIME_LIMIT = 10


def _start_ui(places: dict, log: Path) -> ServerProcess:
    """`loraft ui` as users start it: its own process, its worker processes, Landlock where the kernel has it."""
    return ServerProcess(
        lambda port: [sys.executable, "-m", "loraft.cli", "ui", "--workspace", str(places["workspace"]), "--port",
                      str(port), "--time-limit", str(TIME_LIMIT)],
        log, ready_path="/api/health", environment={"HOME": str(places["home"])})


@pytest.fixture(scope="module")
def real_ui(places, tmp_path_factory):
    server = _start_ui(places, tmp_path_factory.mktemp("ui-log") / "ui.log")
    yield server
    server.stop()


def _health_latencies(base: str, stop: threading.Event, seen: list) -> None:
    with httpx.Client(base_url=base, timeout=10) as health:
        while not stop.is_set():
            started = time.monotonic()
            assert health.get("/api/health").json() == {"ok": True}
            seen.append(time.monotonic() - started)
            time.sleep(0.1)


def test_no_request_holds_the_server(real_ui):
    """A backtracking target pattern, a YAML document of nested aliases and a stuck plan run in a worker process:
    the UI keeps answering within a second meanwhile, the request gets one sentence at the time limit, and the
    next plan is answered by a fresh worker."""
    stop, latencies = threading.Event(), []
    watcher = threading.Thread(target=_health_latencies, args=(real_ui.url, stop, latencies))
    watcher.start()
    try:
        with httpx.Client(base_url=real_ui.url, timeout=60) as ui, ThreadPoolExecutor(2) as pool:
            # the plan, and a start (it checks the same plan: the pattern is stopped there, not in a run that would
            # hang), at once: each holds one of the UI's two workers until the time limit
            def timed_plan():
                started = time.monotonic()
                answer = ui.post("/api/plan", json={"config": "configs/run.yaml",
                                                    "overrides": [f"adapter.target_modules={BACKTRACKING}"]})
                return answer, time.monotonic() - started

            planned = pool.submit(timed_plan)
            started = pool.submit(ui.post, "/api/runs", json={"name": "backtracks", "config": "configs/run.yaml",
                                                              "overrides": [f"adapter.target_modules={BACKTRACKING}"]})
            answer, took = planned.result()
            assert_refused(answer, 400, f"the plan took longer than {TIME_LIMIT} s and was stopped (loraft ui "
                                        "--time-limit): a "
                                        "target pattern that backtracks, or more data than this machine checks in "
                                        "that time?")
            assert took < TIME_LIMIT + 16
            answer = started.result()
            assert answer.status_code == 400 and answer.json()["error"].startswith(
                f"the config check took longer than {TIME_LIMIT} s"), answer.text
            aliases = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
                f"{chr(98 + level)}: &{chr(98 + level)} [{', '.join(['*' + chr(97 + level)] * 10)}]\n"
                for level in range(8))
            assert ui.post("/api/plan", json={"config": aliases}).status_code == 400
            answer = ui.post("/api/plan", json={"config": "configs/run.yaml"})
            assert answer.status_code == 200, answer.text
    finally:
        stop.set()
        watcher.join()
    assert latencies and max(latencies) < 1.0, max(latencies)


PROBE = """
import os, sys
from loraft.ui.start import enter_workspace
from loraft.ui.workspace import Workspace
print(enter_workspace(Workspace(sys.argv[1]), log=lambda line: None))
for name in ("LORAFT_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    print(name, os.environ.get(name))
try:
    print(open(sys.argv[2]).read())
except OSError as exc:
    print(type(exc).__name__)
"""


@pytest.mark.skipif(landlock.available() is None, reason="this kernel has no Landlock")
def test_the_ui_process_reads_nothing_of_the_folder_it_was_started_from(places, tmp_path):
    """`python -m loraft.cli ui` puts the folder it was started from on sys.path: entering the workspace takes it
    off and never grants it, and makes everything the UI starts download nothing (no --allow-hub)."""
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "secret.txt").write_text("secret")
    ran = subprocess.run([sys.executable, "-m", "probe", str(places["workspace"]), str(tmp_path / "secret.txt")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [str(landlock.available()), "LORAFT_OFFLINE 1", "HF_HUB_OFFLINE 1",
                                       "HF_DATASETS_OFFLINE 1", "PermissionError"]


@pytest.mark.skipif(landlock.available() is None, reason="this kernel has no Landlock")
@pytest.mark.parametrize("confined", [True, False], ids=["landlock", "checks-only"])
def test_a_symlink_swapped_after_the_check_leads_nowhere(real_ui, client, places, confined):
    """The UI checks `data/swap.jsonl` (a file in the workspace) and launches the run; the file is then replaced by
    a symbolic link to the outside canary before the trainer reads it (it is still importing torch). Under Landlock
    the kernel refuses the trainer's open: the run fails naming the file and never trains on the canary. The
    control, the UI's app with the paths checked and no kernel confinement (in this process, which never enters
    Landlock: what --no-kernel-confinement leaves), shows the window is real: its trainer reads the canary."""
    workspace = places["workspace"]
    server = httpx.Client(base_url=real_ui.url, timeout=60) if confined else client
    name = "swapped" if confined else "swapped-control"
    swap = workspace / "data" / f"{name}.jsonl"
    write_alpaca(swap)
    try:
        info = server.get("/api/info").json()
        assert info["kernel_confinement"] == (landlock.available() if confined else None)
        answer = server.post("/api/runs", json={"name": name, "config": "configs/run.yaml",
                                                "overrides": [f"data.path=data/{name}.jsonl"]})
        assert answer.status_code == 202, answer.text
        swap.unlink()
        swap.symlink_to(places["outside"] / "canary.jsonl")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            detail = server.get(f"/api/runs/{name}").json()
            if detail["state"]["status"] not in ("starting", "running"):
                break
            time.sleep(0.5)
        if confined:
            assert detail["state"]["status"] == "failed", detail
            assert detail["error"] == f"data/{name}.jsonl: cannot be read (Permission denied)", detail["error"]
            assert not (workspace / name / "adapter_model.safetensors").exists()
        else:
            assert detail["state"]["status"] == "finished", detail
            assert detail["data_report"]["records_read"] == 1  # the canary's one record, read through the link
    finally:
        if confined:
            server.close()
        swap.unlink()
        shutil.rmtree(workspace / name, ignore_errors=True)
        for leftover in (workspace / ".loraft-ui" / "runs").glob(f"{name}*"):
            leftover.unlink()
