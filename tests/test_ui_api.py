"""The REST API of `loraft ui` (docs/ui.md), through an in-process client, with real `loraft train` and job
processes started by it.

Every refusal asserts its status and its one sentence. The real run is started first and trains in the background
(its own process, as the UI starts it) while the tests that need no run go on; the tests that need it wait for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import TINY_RUN_YAML, write_alpaca
from loraft.cli import main
from loraft.config import load_config
from loraft.errors import RunError
from loraft.liveness import RunLock
from loraft.ui.app import create_app
from loraft.ui.requests import UISettings
from loraft.ui.start import serve_ui
from loraft.ui.events import run_events
from loraft.ui.workspace import Workspace
from run_helpers import free_port

RUN_YAML = TINY_RUN_YAML
LIVE = ("starting", "running")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bloom_dir) -> Path:
    """A workspace with data, the tiny BLOOM as `base/` and a config file; runs are relative to it."""
    root = tmp_path_factory.mktemp("ui-api").resolve()
    write_alpaca(root / "data" / "train.jsonl", repeat=2)
    shutil.copytree(tiny_bloom_dir, root / "base")
    (root / "configs").mkdir()
    (root / "configs" / "run.yaml").write_text(RUN_YAML, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def client(workspace):
    with TestClient(create_app(workspace), base_url="http://127.0.0.1") as opened:
        yield opened


@pytest.fixture(scope="module")
def launched(client, workspace):
    """A real run started through the API (its own process, one thread), not waited for."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the process the UI starts inherits the UI's environment
        answer = client.post("/api/runs", json={"name": "tiny", "config": RUN_YAML,
                                                "overrides": ["train.seed=7"]})
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"name": "tiny"}
    return workspace / "tiny"


@pytest.fixture(scope="module")
def trained(client, launched):
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = next(run for run in client.get("/api/runs").json() if run["name"] == "tiny")
        if state["status"] not in LIVE:
            break
        time.sleep(0.5)
    assert state["status"] == "finished", client.get("/api/runs/tiny/log").json()
    return launched


def assert_refused(response, status: int, sentence: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": sentence}


def fake_run(path: Path, **record) -> Path:
    path.mkdir(parents=True)
    (path / "loraft_run.json").write_text(json.dumps(record))
    return path


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def wait_for_launched(launch_file: Path, timeout: float = 120) -> None:
    """Until every process the UI launched for a run (its launch file's starts) has ended: one may still write into
    the run directory after its status is no longer live (a zombie counts as ended: the UI reaps it later)."""
    starts = json.loads(launch_file.read_text())["starts"] if launch_file.exists() else []
    deadline = time.monotonic() + timeout
    for start in starts:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{start['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # gone
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------- a launch
def test_a_launch_answers_at_once_and_is_listed_while_it_starts(client, launched, workspace):
    state = next(run for run in client.get("/api/runs").json() if run["name"] == "tiny")
    assert state["status"] in ("starting", "running", "finished")
    assert set(state) == {"name", "status", "step", "total_steps", "loss", "started_at", "checkpoint", "base_model"}
    assert (workspace / ".loraft-ui" / "runs" / "tiny.yaml").read_text(encoding="utf-8") == RUN_YAML
    again = client.post("/api/runs", json={"name": "tiny", "config": RUN_YAML})
    assert again.status_code == 409 and again.json()["error"] in (  # before or after `loraft train` made the folder
        f"a run named 'tiny' exists already ({workspace / 'tiny'}); choose another name",
        "a run named 'tiny' is starting already; choose another name")


# ---------------------------------------------------------------------------------------------- refusals
def test_paths_leaving_the_workspace_are_refused(client, workspace, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (workspace / "escape").symlink_to(outside, target_is_directory=True)
    try:
        cases = {
            str(outside / "data.jsonl"): f"path {str(outside / 'data.jsonl')!r} is outside the workspace "
                                         f"{workspace}; give a path inside it",
            "../secret/data.jsonl": "path '../secret/data.jsonl' climbs out with '..'; give a path inside the "
                                    "workspace",
            "data/../../secret/data.jsonl": "path 'data/../../secret/data.jsonl' climbs out with '..'; give a path "
                                            "inside the workspace",
            "escape/data.jsonl": "path 'escape/data.jsonl' leads outside the workspace through a symbolic link",
            "": "path is empty; give a path relative to the workspace",
            "data/a\0b": "path holds a NUL character",
            "data/missing.jsonl": f"path 'data/missing.jsonl' does not exist in the workspace {workspace}",
        }
        for path, sentence in cases.items():
            assert_refused(client.post("/api/data/check", json={"path": path}), 400, sentence)
        assert_refused(client.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "/etc"}), 400,
                       f"model '/etc' is outside the workspace {workspace}; give a path inside it")
        assert_refused(client.post("/api/runs", json={"name": "x", "config": "../configs/run.yaml"}), 400,
                       "config '../configs/run.yaml' climbs out with '..'; give a path inside the workspace")
    finally:
        (workspace / "escape").unlink()


def test_bad_bodies_are_400s_naming_the_field(client):
    response = client.post("/api/plan", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_refused(response, 400, "We could not parse the JSON body of your request: it is not valid JSON.")
    assert_refused(client.post("/api/plan", content=b"[1]", headers={"Content-Type": "application/json"}), 400,
                   "The request body must be a JSON object.")
    assert_refused(client.post("/api/plan", content=b'{"config": "demo"}', headers={"Content-Type": "text/plain"}),
                   415, "Content-Type must be application/json (got 'text/plain').")
    assert_refused(client.post("/api/plan", json={"config": "demo", "overides": []}), 400,
                   "unknown key 'overides' in the request body (known keys: config, overrides, name)")
    assert_refused(client.post("/api/plan", json={"config": "demo", "overrides": "train.max_steps=3"}), 400,
                   "overrides must be a list of strings (got a string)")
    assert_refused(client.post("/api/plan", json={"config": 3}), 400, "config must be a string (got a number)")
    assert_refused(client.post("/api/plan", json={}), 400, "config is required")
    assert_refused(client.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "base",
                                                          "limit": True}), 400,
                   "limit must be an integer (got a boolean)")
    assert_refused(client.post("/api/data/check", json={"path": "data/train.jsonl", "max_length": 1}), 400,
                   "max_length must be >= 2 (got 1)")
    assert_refused(client.post("/api/data/check", json={"path": "data/train.jsonl", "format": "csvish"}), 400,
                   "format: Input should be 'auto', 'alpaca', 'messages', 'sharegpt', 'preference_alpaca', "
                   "'preference_messages', 'preference_sharegpt', 'unpaired_alpaca', 'unpaired_messages' or "
                   "'unpaired_sharegpt'")
    assert_refused(client.post("/api/runs", json={"name": "../up", "config": "demo"}), 400,
                   "name '../up' is not a run name: use letters, digits, '.', '_' and '-' (at most 64, starting "
                   "with a letter or digit)")
    assert_refused(client.post("/api/runs", json={"name": "bad", "config": "model:\n  rank: 3\n"}), 400,
                   "config with overrides: unknown config key model.rank")
    assert_refused(client.post("/api/runs", json={"name": "bad", "config": "configs/run.yaml",
                                                  "overrides": ["output_dir=/tmp/elsewhere"]}), 400,
                   "overrides: 'output_dir=/tmp/elsewhere' is not allowed; the run's directory is WORKSPACE/NAME, "
                   "set by its name")
    assert_refused(client.post("/api/runs", json={"name": "bad", "config": "configs/run.yaml",
                                                  "overrides": ["--resume"]}), 400,
                   "override '--resume' must look like key=value (e.g. train.max_steps=3)")
    assert_refused(client.get("/api/runs/tiny/log?lines=many"), 400,
                   "lines must be a whole number from 1 to 100000 (got 'many')")
    assert_refused(client.get("/api/nothing"), 404, "/api/nothing: no such page or API route")


def test_unknown_runs_and_jobs_are_404s(client, workspace):
    sentence = f"no run named 'nope' in the workspace {workspace}"
    for method, path in (("GET", "/api/runs/nope"), ("GET", "/api/runs/nope/log"), ("GET", "/api/runs/nope/events"),
                         ("POST", "/api/runs/nope/stop"), ("POST", "/api/runs/nope/resume"),
                         ("GET", "/chat/nope/v1/models")):
        assert_refused(client.request(method, path), 404, sentence)
    assert_refused(client.post("/api/runs/nope/jobs", json={"kind": "merge"}), 404, sentence)
    assert_refused(client.get("/api/jobs/20250101-000000-merge-abcd"), 404,
                   "no job '20250101-000000-merge-abcd' in the workspace")


def test_the_token_is_required_and_compared_in_constant_time(workspace, monkeypatch):
    import loraft.ui.requests as requests_module

    compared = []
    real_compare = requests_module.hmac.compare_digest

    def spy(sent, token):
        compared.append((sent, token))
        return real_compare(sent, token)

    monkeypatch.setattr(requests_module.hmac, "compare_digest", spy)
    with TestClient(create_app(workspace, UISettings(token="s3cret")), base_url="http://127.0.0.1") as guarded:
        assert_refused(guarded.get("/api/runs"), 401, "this UI needs its token: send it in the X-Loraft-Token header")
        assert_refused(guarded.get("/api/runs", headers={"X-Loraft-Token": "s3cre"}), 401,
                       "the X-Loraft-Token header does not match this UI's token")
        assert compared == [(b"s3cre", b"s3cret")]
        assert guarded.get("/api/runs", headers={"X-Loraft-Token": "s3cret"}).status_code == 200
        assert guarded.get("/api/info", headers={"X-Loraft-Token": "s3cret"}).json()["token_required"] is True
        # the chat API takes it as a bearer key too (the chat page's own key box); the page itself is public
        assert_refused(guarded.get("/chat/nope/v1/models"), 401,
                       "this UI needs its token: send it in the X-Loraft-Token header")
        assert_refused(guarded.get("/chat/nope/v1/models", headers={"Authorization": "Bearer s3cret"}), 404,
                       f"no run named 'nope' in the workspace {workspace}")
        assert guarded.get("/chat/nope/").status_code == 200
        assert guarded.get("/static/app.js").status_code == 200


def test_host_and_origin_are_checked_before_anything_else(workspace):
    app = create_app(workspace, UISettings(token="s3cret", host="127.0.0.1", port=7860))
    with TestClient(app, base_url="http://127.0.0.1:7860") as ui:
        refused = ui.get("/api/runs", headers={"Host": "evil.example:7860"})
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == (
            "Host header 'evil.example:7860' is not allowed: this server answers to 127.0.0.1, [::1], localhost on "
            "port 7860; add names with --allowed-hosts.")
        headers = {"X-Loraft-Token": "s3cret"}
        assert ui.get("/api/runs", headers={**headers, "Host": "localhost:7860"}).status_code == 200
        assert_refused(ui.post("/api/runs/nope/stop", headers={**headers, "Origin": "http://evil.example"}), 403,
                       "a request from another site (http://evil.example) is refused: use the UI's own page")
        assert ui.post("/api/runs/nope/stop", headers={**headers, "Origin": "http://127.0.0.1:7860"}).status_code == 404
        assert "access-control-allow-origin" not in ui.get("/api/info", headers=headers).headers
        # a GET that another site's page makes (an <img> pointing at the chat API would load a model)
        for path in ("/api/runs", "/chat/nope/v1/models"):
            assert_refused(ui.get(path, headers={**headers, "Sec-Fetch-Site": "cross-site"}), 403,
                           "a request from another site is refused: use the UI's own page")
        assert ui.get("/api/runs", headers={**headers, "Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert ui.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # the page holds no data


def test_a_config_reaches_nothing_outside_the_workspace_and_runs_no_model_code_or_reward_code(client, workspace):
    def plan(yaml_text):
        return client.post("/api/plan", json={"config": yaml_text, "name": "x"})

    assert_refused(plan("model:\n  name_or_path: base\n  trust_remote_code: true\n"), 400,
                   "model.trust_remote_code: the UI does not run code shipped with a model; train such a model with "
                   "`loraft train` on the command line")
    # a GRPO reward names code to import: the UI offers the built-ins only
    assert_refused(plan("model:\n  name_or_path: base\ntrain:\n  objective: grpo\ngrpo:\n  rewards:\n"
                        "    - {type: number}\n    - {type: function, function: 'os:system'}\n"), 400,
                   "grpo.rewards.1: the UI offers the built-in rewards only and never imports code a request names "
                   "(os:system); train with a function reward with `loraft train` on the command line")
    assert_refused(plan("model:\n  name_or_path: /etc\n"), 400,
                   f"model.name_or_path '/etc' is outside the workspace {workspace}; give a path inside it")
    assert_refused(plan("model:\n  name_or_path: base\ndata:\n  path: ../secret.jsonl\n"), 400,
                   "data.path '../secret.jsonl' climbs out with '..'; give a path inside the workspace")
    assert_refused(plan("model:\n  name_or_path: base\ndata:\n  path: data/train.jsonl\n  cache_dir: /tmp/elsewhere\n"),
                   400,
                   f"data.cache_dir '/tmp/elsewhere' is outside the workspace {workspace}; give a path inside it")
    # the run a preference run continues from is a folder on this machine, never a hub id: always confined
    assert_refused(plan("model:\n  name_or_path: base\n  adapter_from: ../sft\n"), 400,
                   "model.adapter_from '../sft' climbs out with '..'; give a path inside the workspace")
    assert_refused(plan("model:\n  name_or_path: base\n  adapter_from: /tmp/sft\n"), 400,
                   f"model.adapter_from '/tmp/sft' is outside the workspace {workspace}; give a path inside it")
    (workspace / "sft-elsewhere").symlink_to("/tmp", target_is_directory=True)
    try:
        assert_refused(plan("model:\n  name_or_path: base\n  adapter_from: sft-elsewhere/run\n"), 400,
                       "model.adapter_from 'sft-elsewhere/run' leads outside the workspace through a symbolic link")
    finally:
        (workspace / "sft-elsewhere").unlink()
    assert_refused(client.post("/api/data/check", json={"path": "x" * 300}), 400,
                   f"path '{'x' * 300}' cannot be read (File name too long)")
    assert_refused(client.post("/api/plan", json={"config": "configs/dir.yaml"}), 400,
                   "config 'configs/dir.yaml' does not exist in the workspace " + str(workspace))
    (workspace / "folder.yaml").mkdir()
    try:
        assert_refused(client.post("/api/plan", json={"config": "folder.yaml"}), 400,
                       f"{workspace / 'folder.yaml'}: cannot read the config file (Is a directory)")
    finally:
        (workspace / "folder.yaml").rmdir()


def test_a_non_loopback_address_without_a_token_refuses_to_start(workspace, monkeypatch, capsys):
    monkeypatch.delenv("LORAFT_UI_TOKEN", raising=False)
    port = free_port()
    assert main(["ui", "--workspace", str(workspace), "--host", "0.0.0.0", "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        "error: loraft ui: refusing to listen on 0.0.0.0 without a token (anyone who reaches it could start runs on "
        "this machine); pass --token T or set LORAFT_UI_TOKEN\n")
    with socket.socket() as probe:  # nothing was left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    with pytest.raises(RunError, match="^nowhere: workspace directory not found$"):
        serve_ui("nowhere", token=None)


# ------------------------------------------------------------------------------------------- fake runs
def test_runs_are_listed_with_their_live_status(client, workspace):
    host = socket.gethostname()
    fake_run(workspace / "done", status="finished", global_step=4, total_steps=4, base_model="m")
    fake_run(workspace / "killed", status="running", pid=dead_pid(), host=host, started_at="2025-05-01T10:00:00+02:00")
    live = fake_run(workspace / "group" / "live", status="running", pid=os.getpid(), host=host)
    (workspace / "done" / "metrics.jsonl").write_text('{"step": 4, "loss": 1.5}\n')
    launch_dir = workspace / ".loraft-ui" / "runs"
    launch_dir.mkdir(parents=True, exist_ok=True)
    (launch_dir / "ghost.json").write_text(json.dumps({"name": "ghost", "starts": [
        {"kind": "train", "argv": ["python"], "pid": dead_pid(), "started_at": "2025-05-01T10:00:00+02:00"}]}))
    (workspace / "ghost").mkdir()  # a start that failed before its trainer wrote a record: only its console
    (workspace / "ghost" / "console.log").write_text("loading\nerror: data/x.jsonl: data file not found\n")
    lock = RunLock(live).acquire()
    try:
        listed = {run["name"]: run for run in client.get("/api/runs").json()}
        assert {name: run["status"] for name, run in listed.items() if name != "tiny"} == {
            "done": "finished", "killed": "interrupted", "group/live": "running", "ghost": "failed"}
        assert (listed["done"]["step"], listed["done"]["loss"], listed["done"]["base_model"]) == (4, 1.5, "m")
        detail = client.get("/api/runs/group/live").json()
        assert detail["state"]["pid"] == os.getpid() and detail["state"]["recorded_status"] == "running"
        assert client.get("/api/runs/ghost").json()["error"] == "data/x.jsonl: data file not found"
        assert client.get("/api/runs/ghost/log?lines=1").json() == {
            "train_log": [], "console": ["error: data/x.jsonl: data file not found"]}
        assert_refused(client.post("/api/runs/done/resume"), 409, "run 'done' has finished; there is nothing to resume")
        assert_refused(client.post("/api/runs/group/live/resume"), 409,
                       "run 'group/live' is running; it cannot be resumed while it runs")
        assert_refused(client.post("/api/runs/killed/resume"), 409,
                       "run 'killed' has no complete checkpoint to resume from; start it again under a new name")
        assert_refused(client.post("/api/runs/done/stop"), 409, f"{workspace / 'done'}: the run is not running "
                                                                 "(status finished); nothing to stop")
        assert_refused(client.post("/api/runs/killed/jobs", json={"kind": "merge"}), 409,
                       "run 'killed' is interrupted; merge needs a finished run")
        assert_refused(client.post("/api/runs/done/jobs", json={"kind": "merge", "dtype": "fp8"}), 400,
                       "dtype must be one of bf16, fp16, fp32 (got 'fp8')")
        assert_refused(client.post("/api/runs/done/jobs", json={"kind": "train"}), 400,
                       "kind must be one of eval, merge, export (got 'train')")
        assert_refused(client.post("/api/runs/done/jobs", json={"kind": "eval", "data": "../x"}), 400,
                       "data '../x' climbs out with '..'; give a path inside the workspace")
    finally:
        lock.release()
        for name in ("done", "killed", "group", "ghost"):
            shutil.rmtree(workspace / name)
        (launch_dir / "ghost.json").unlink()


FAKE_TRAINER = """
import json, os, socket, sys, time
from loraft.liveness import RunLock
lock = RunLock(sys.argv[1]).acquire()
with open(os.path.join(sys.argv[1], "loraft_run.json"), "w") as record:
    json.dump({"status": "running", "pid": os.getpid(), "host": socket.gethostname()}, record)
print("holding the lock", flush=True)
time.sleep(60)
"""


def test_stop_answers_once_the_signal_is_sent(client, workspace):
    run_dir = workspace / "stoppable"
    run_dir.mkdir()
    trainer = subprocess.Popen([sys.executable, "-c", FAKE_TRAINER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    early_argv = [sys.executable, "-c", "import time; time.sleep(60)", f"output_dir={workspace / 'early'}"]
    early = subprocess.Popen(early_argv)
    launch = workspace / ".loraft-ui" / "runs" / "early.json"
    launch.parent.mkdir(parents=True, exist_ok=True)
    launch.write_text(json.dumps({"name": "early", "starts": [{"kind": "train", "argv": early_argv,
                                                               "pid": early.pid}]}))
    try:
        assert trainer.stdout.readline() == "holding the lock\n"
        answer = client.post("/api/runs/stoppable/stop")
        assert answer.status_code == 202 and answer.json()["status"] in ("running", "interrupted")
        assert trainer.wait(timeout=30) == -signal.SIGTERM  # this trainer has no handler: SIGTERM's default action
        assert client.get("/api/runs/stoppable").json()["state"]["status"] == "interrupted"
        # a run still starting (no record yet) is ended before it begins
        assert client.get("/api/runs/early").json()["state"]["status"] == "starting"
        assert client.post("/api/runs/early/stop").status_code == 202
        assert early.wait(timeout=30) == -signal.SIGTERM
        detail = client.get("/api/runs/early").json()
        assert (detail["state"]["status"], detail["error"]) == ("failed", "stopped before the run began")
    finally:
        for process in (trainer, early):
            process.kill()
            process.wait()
        shutil.rmtree(run_dir)
        launch.unlink()


def test_resume_checks_the_runs_config_and_launches_the_checked_copy(client, workspace):
    run_dir = fake_run(workspace / "paused", status="stopped", step=2)
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run_dir / "config.yaml").write_text("bogus: 1\n")
    launch_file = workspace / ".loraft-ui" / "runs" / "paused.json"
    try:  # a config that does not load is the request's sentence, and nothing starts
        assert_refused(client.post("/api/runs/paused/resume"), 400,
                       f"{run_dir / 'config.yaml'}: unknown config key bogus")
        assert not launch_file.exists()
        # one that loads resumes from the UI's own copy of it; the user is shown the CLI's resume command
        (run_dir / "config.yaml").write_text(RUN_YAML + f"output_dir: {run_dir}\n")
        answer = client.post("/api/runs/paused/resume", headers={"Content-Type": "application/json"}, content=b"{}")
        assert answer.status_code == 202 and answer.json() == {"name": "paused"}, answer.text
        detail = client.get("/api/runs/paused").json()
        checked = workspace / ".loraft-ui" / "runs" / "paused.checked.yaml"
        start = json.loads(launch_file.read_text())["starts"][-1]
        assert start["argv"] == detail["launched_command"] == [
            sys.executable, "-m", "loraft.cli", "train", str(checked), "--resume"]
        assert start["command"] == detail["resume_command"] == [
            sys.executable, "-m", "loraft.cli", "train", str(run_dir / "config.yaml"), "--resume"]
        assert load_config(checked) == load_config(run_dir / "config.yaml")
        deadline = time.monotonic() + 60
        while client.get("/api/runs/paused").json()["state"]["status"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.2)
        console = "\n".join(client.get("/api/runs/paused/log").json()["console"])
        assert f"train {checked} --resume" in console  # the launched process read the checked copy
    finally:
        wait_for_launched(launch_file)
        shutil.rmtree(run_dir)
        for leftover in (workspace / ".loraft-ui" / "runs").glob("paused*"):
            leftover.unlink()


# ------------------------------------------------------------------------------------------------ events
def sse_blocks(text: str) -> list[dict]:
    blocks = []
    for block in text.split("\n\n"):
        if not block or block.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        blocks.append(fields)
    return blocks


def test_events_replay_after_last_event_id_and_end_with_the_final_state(client, workspace):
    run_dir = fake_run(workspace / "curve", status="finished", total_steps=3)
    lines = [json.dumps({"step": step, "loss": 2.0 - step / 10}) for step in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')  # the last one is cut
    try:
        response = client.get("/api/runs/curve/events", headers={"Last-Event-ID": "1"})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        blocks = sse_blocks(response.text)
        tag = f"{(run_dir / 'metrics.jsonl').stat().st_ino:x}"  # which file the line numbers count in
        assert blocks[:2] == [{"event": "metric", "id": f"2-{tag}", "data": lines[1]},
                              {"event": "metric", "id": f"3-{tag}", "data": lines[2]}]
        assert blocks[2]["event"] == "state" and json.loads(blocks[2]["data"])["status"] == "finished"
        assert len(blocks) == 3
        # a client that holds more lines than the file has now starts over
        assert [block["event"] for block in sse_blocks(client.get(
            "/api/runs/curve/events", headers={"Last-Event-ID": "9"}).text)] == ["reset", "metric", "metric",
                                                                                "metric", "state"]
        assert [block["event"] for block in sse_blocks(client.get(  # the same file: nothing new to replay
            "/api/runs/curve/events", headers={"Last-Event-ID": f"3-{tag}"}).text)] == ["state"]
        # a resume replaced the file (trimmed, then grown past the client's line): the client starts over
        replaced = run_dir / "metrics.new"
        replaced.write_text("\n".join(lines) + "\n")
        os.replace(replaced, run_dir / "metrics.jsonl")
        assert [block["event"] for block in sse_blocks(client.get(
            "/api/runs/curve/events", headers={"Last-Event-ID": f"2-{tag}"}).text)] == ["reset", "metric", "metric",
                                                                                    "metric", "state"]
        assert_refused(client.get("/api/runs/curve/events", headers={"Last-Event-ID": "two"}), 400,
                       "Last-Event-ID must be an id this stream sent, LINE-FILE (got 'two')")
    finally:
        shutil.rmtree(run_dir)


def test_events_carry_a_preference_runs_rewards(client, workspace):
    """The reward charts are drawn from the metric events: TRL's rewards/* keys arrive as the trainer logged them."""
    run_dir = fake_run(workspace / "dpo-curve", status="finished", total_steps=2)
    lines = [json.dumps({"step": step, "loss": 0.69 - step / 100, "rewards/chosen": step / 10,
                         "rewards/rejected": -step / 10, "rewards/accuracies": step / 2, "rewards/margins": step / 5,
                         "logps/chosen": -12.5, "logps/rejected": -14.0}) for step in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    try:
        blocks = sse_blocks(client.get("/api/runs/dpo-curve/events").text)
        metrics = [json.loads(block["data"]) for block in blocks if block["event"] == "metric"]
        assert [block["data"] for block in blocks if block["event"] == "metric"] == lines
        assert [metric["rewards/margins"] for metric in metrics] == [0.2, 0.4]
    finally:
        shutil.rmtree(run_dir)


def test_events_send_reset_when_the_file_shrinks(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3)))
    calls = []

    def read_state() -> dict:
        calls.append(len(calls))
        if len(calls) == 1:  # a resume trims the file to its checkpoint: a new file, shorter
            trimmed = tmp_path / "trimmed"
            trimmed.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2, "resumed": True}) + "\n")
            os.replace(trimmed, metrics)
        return {"status": "running" if len(calls) < 4 else "finished"}

    async def collect() -> list[str]:
        return [chunk async for chunk in run_events(metrics, read_state, poll_seconds=0.01, keepalive_seconds=0)]

    chunks = asyncio.run(collect())
    assert ": keep-alive\n\n" in chunks  # nothing new on the third poll
    blocks = sse_blocks("".join(chunks))
    events = [(block["event"], block["id"].split("-")[0] if "id" in block else None, block["data"]) for block in blocks]
    files = [block["id"].split("-")[1] for block in blocks if "id" in block]
    assert len(set(files[:3])) == len(set(files[3:])) == 1 and files[0] != files[3]  # the rewrite is a new file
    assert events == [
        ("metric", "1", '{"step": 1}'), ("metric", "2", '{"step": 2}'), ("metric", "3", '{"step": 3}'),
        ("state", None, '{"status": "running"}'),
        ("reset", None, "{}"), ("metric", "1", '{"step": 1}'), ("metric", "2", '{"step": 2, "resumed": true}'),
        ("state", None, '{"status": "finished"}'),
    ]


# ------------------------------------------------------------------------------------------ data, plan
def test_data_preview_and_check_answer_what_the_cli_prints(client, workspace, capsys):
    data = workspace / "data" / "train.jsonl"
    assert main(["data", "preview", str(data), "--model", str(workspace / "base"), "--max-length", "24",
                 "--limit", "3", "--json"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    answer = client.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "base", "max_length": 24,
                                                    "limit": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["samples"] == expected
    assert main(["data", "check", str(data), "--model", str(workspace / "base"), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    report = client.post("/api/data/check", json={"path": "data/train.jsonl", "model": "base"}).json()
    report.pop("cache_hit"), expected.pop("cache_hit")  # whether an earlier test tokenized the same file first
    assert report == expected
    assert_refused(client.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "no such model!"}),
                   400, f"model 'no such model!' does not exist in the workspace {workspace}")


PREFERENCE_PAIRS = [  # LLaMA-Factory's alpaca ranking format
    {"instruction": "人工智能是什么", "input": "", "chosen": "人工智能是计算机科学的一个分支。", "rejected": "不知道。"},
    {"instruction": "请把下面的句子翻译成英文", "input": "今天天气很好", "chosen": "The weather is nice today.",
     "rejected": "今天天气很好"},
]
UNPAIRED = [  # KTO: one completion and its label
    {"prompt": "人工智能是什么", "completion": "人工智能是计算机科学的一个分支。", "label": True},
    {"prompt": "你好", "completion": "不知道。", "label": False},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("records, limits", [(PREFERENCE_PAIRS, {"max_prompt_length": 20, "max_completion_length": 3}),
                                            (UNPAIRED, {})], ids=["pairs", "unpaired"])
def test_preference_data_previews_and_checks_as_loraft_preference_does(client, workspace, records, limits):
    from loraft.config import DataConfig, PreferenceConfig, RunConfig
    from loraft.model import load_tokenizer
    from loraft.preference import check, preview

    path = write_jsonl(workspace / "data" / "preferences.jsonl", records)
    tokenizer = load_tokenizer(str(workspace / "base"))
    data = DataConfig(path=str(path), max_length=64, limit=2)
    expected = preview(str(path), RunConfig(data=data, preference=PreferenceConfig(**limits)), tokenizer, 2)
    answer = client.post("/api/data/preview", json={"path": "data/preferences.jsonl", "model": "base",
                                                    "max_length": 64, "limit": 2, **limits})
    assert answer.status_code == 200, answer.text
    assert answer.json()["preference"] is True
    samples = answer.json()["samples"]
    sides = ("chosen", "rejected") if "chosen" in records[0] else ("completion",)
    for side in sides:  # what the page highlights: the supervised span of each completion
        assert [sample[side]["labels"] for sample in samples] == [sample[side]["labels"] for sample in expected]
    assert samples == json.loads(json.dumps(expected))
    if limits:  # the cuts were made: a prompt kept its end, a completion its start
        assert samples[1]["prompt_truncated"] and all(samples[1][side]["truncated"] for side in sides)
    else:
        assert [sample["label"] for sample in samples] == [True, False]

    report = client.post("/api/data/check", json={"path": "data/preferences.jsonl", "model": "base",
                                                  "max_length": 64, **limits})
    assert report.status_code == 200, report.text
    # the same report, read through the one cache (the page's check filled it: this one is a hit)
    direct = check(str(path), RunConfig(data=DataConfig(path=str(path), max_length=64),
                                        preference=PreferenceConfig(**limits)), tokenizer)
    assert (report.json().pop("cache_hit"), direct.pop("cache_hit")) == (False, True)
    assert {**report.json(), "cache_hit": None} == {**direct, "cache_hit": None}
    assert client.post("/api/data/check", json={"path": "data/preferences.jsonl"}).json()["records_read"] == 2


def test_bad_preference_records_and_limits_are_one_sentence(client, workspace):
    write_jsonl(workspace / "data" / "bad-pairs.jsonl", [PREFERENCE_PAIRS[0], {"instruction": "你好", "chosen": "好"}])
    for route, body in (("check", {}), ("preview", {"model": "base"})):
        assert_refused(client.post(f"/api/data/{route}", json={"path": "data/bad-pairs.jsonl", **body}), 400,
                       f"{workspace / 'data' / 'bad-pairs.jsonl'}, line 2, field 'rejected': missing (the record has "
                       "instruction, chosen)")
    assert_refused(client.post("/api/data/check", json={"path": "data/train.jsonl", "max_prompt_length": 0}), 400,
                   "max_prompt_length: must be > 0 or null (got 0)")
    assert_refused(client.post("/api/data/check", json={"path": "data/train.jsonl", "max_length": 24,
                                                        "max_prompt_length": 24}), 400,
                   "preference.max_prompt_length must be < data.max_length, to leave room for the completion (got "
                   "24 >= 24)")
    assert_refused(client.post("/api/data/check", json={"path": "data/train.jsonl", "max_completion_length": "4"}),
                   400, "max_completion_length must be an integer (got a string)")


def test_plan_shows_the_exact_command(client, workspace):
    answer = client.post("/api/plan", json={"config": "configs/run.yaml", "overrides": ["train.max_steps=5"],
                                            "name": "planned"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["command"] == [sys.executable, "-m", "loraft.cli", "train", str(workspace / "configs" / "run.yaml"),
                               "train.max_steps=5", f"output_dir={workspace / 'planned'}"]
    assert body["command_text"].startswith("loraft train ") and body["command_text"].endswith(
        f"train.max_steps=5 output_dir={workspace / 'planned'}")
    assert set(body["plan"]) == {"model", "plan", "parameters", "memory", "autotune"}
    assert body["plan"]["model"].startswith(str(workspace / "base"))  # the model folder is read in the workspace
    demo = client.post("/api/plan", json={"config": "demo"}).json()
    assert f"data.path={workspace / 'demo-data' / 'train.jsonl'}" in demo["command"]
    assert (workspace / "demo-data" / "heldout.jsonl").is_file()
    (workspace / "models").mkdir(exist_ok=True)
    (workspace / "models" / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")  # offered by name: not read here
    info = client.get("/api/info").json()
    assert "configs/run.yaml" in info["yaml_files"] and "demo" in info["presets"]
    # the model field offers the workspace's GGUF files and model folders
    assert {"base", "models/Tiny.Q4_1.gguf", "demo-data/base"} <= set(info["model_files"]), info["model_files"]
    assert not any(path.startswith(".loraft-ui") for path in info["yaml_files"])  # hidden folders are skipped
    assert client.get("/api/schema").json()["properties"]["train"]


def test_static_files_are_confined_and_typed(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    script = client.get("/static/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["x-content-type-options"] == "nosniff"
    assert_refused(client.get("/static/../app.py"), 404, "/app.py: no such page or API route")
    assert_refused(client.get("/static/%2E%2E/app.py"), 404, "/static/../app.py: no such file")
    assert_refused(client.get("/static/nothing.js"), 404, "/static/nothing.js: no such file")


# ------------------------------------------------------------------------------------- the real run
def test_the_launched_run_finishes_with_its_adapter_and_console(client, trained, workspace):
    assert (trained / "adapter_model.safetensors").is_file() and (trained / "adapter_config.json").is_file()
    console = (trained / "console.log").read_text(encoding="utf-8")
    assert f"run directory: {trained}" in console
    detail = client.get("/api/runs/tiny").json()
    assert detail["command"][:5] == [sys.executable, "-m", "loraft.cli", "train",
                                     str(workspace / ".loraft-ui" / "runs" / "tiny.yaml")]
    assert detail["command"][5:] == ["train.seed=7", f"output_dir={trained}"]
    assert detail["command_text"].startswith("loraft train ")
    assert detail["config"]["train"]["seed"] == 7 and detail["config"]["output_dir"] == str(trained)
    assert detail["checkpoints"] == ["checkpoint-2", "checkpoint-3"] and detail["error"] is None
    assert detail["resume_command"] == [sys.executable, "-m", "loraft.cli", "train", str(trained / "config.yaml"),
                                        "--resume"]
    assert_refused(client.post("/api/runs/tiny/resume"), 409, "run 'tiny' has finished; there is nothing to resume")
    events = sse_blocks(client.get("/api/runs/tiny/events").text)
    logged = (trained / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [block["data"] for block in events if block["event"] == "metric"] == logged
    assert json.loads(events[-1]["data"])["status"] == "finished"


def test_a_merge_job_runs_to_its_result(client, trained, workspace):
    answer = client.post("/api/runs/tiny/jobs", json={"kind": "merge"})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 120
    while (job := client.get(f"/api/jobs/{job_id}").json())["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["status"] == "finished", job
    assert (job["kind"], job["run"], job["exit_code"]) == ("merge", "tiny", 0)
    assert job["result"] == {"out_dir": "tiny-merged"}
    assert job["command"] == [sys.executable, "-m", "loraft.cli", "merge", str(trained), "--out",
                              str(workspace / "tiny-merged"), "--dtype", "fp32"]
    assert any("merged model:" in line for line in job["console"])
    assert [listed["id"] for listed in client.get("/api/jobs?run=tiny").json()] == [job_id]
    assert_refused(client.post("/api/runs/tiny/jobs", json={"kind": "merge"}), 409,
                   f"{workspace / 'tiny-merged'} exists already; move or delete it to merge run 'tiny' again")


def test_chat_with_the_run_and_its_base(client, trained):
    models = client.get("/chat/tiny/v1/models")
    assert models.status_code == 200, models.text
    assert models.json()["data"][0]["id"] == "tiny"
    answer = client.post("/chat/tiny/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "人工智能是什么"}], "max_tokens": 3,
        "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    assert client.get("/chat/tiny/v1/models?base=1").json()["data"][0]["id"] == "tiny/base"
    assert client.get("/chat/tiny/v1/models?checkpoint=checkpoint-2").json()["data"][0]["id"] == "tiny/checkpoint-2"
    assert_refused(client.get("/chat/tiny/v1/models?checkpoint=../x"), 400,
                   "checkpoint must be a checkpoint's name like checkpoint-200 (got '../x')")
    page = client.get("/chat/tiny/?base=1")
    assert page.status_code == 200 and "<title>loraft chat</title>" in page.text
    assert client.get("/chat/tiny", follow_redirects=False).headers["location"] == "/chat/tiny/"


def test_chat_models_share_one_base_copy_and_an_evicted_one_is_freed(workspace, trained, tiny_llama_dir):
    """The run, its checkpoint and its base are three chat models on one base copy (three names of one Engine,
    answering as each alone); a model of another base evicts them with capacity 1, and the evicted copy is really
    gone from memory (FastAPI keeps the route functions, and so the Engine, alive: the Engine must drop it)."""
    import asyncio
    import gc
    import weakref

    from peft import PeftModel

    from loraft.train import train
    from loraft.ui.chat import ChatModels

    if not (workspace / "other-base" / "loraft_run.json").is_file():  # a finished run of another base, in the workspace
        shutil.copytree(tiny_llama_dir, workspace / "base-llama", dirs_exist_ok=True)
        train(load_config(None, [f"model.name_or_path={workspace / 'base-llama'}",
                                 f"data.path={workspace / 'data' / 'train.jsonl'}", f"output_dir={workspace / 'other-base'}",
                                 "adapter.target_modules=[q_proj]", "adapter.modules_to_save=null", "train.max_steps=1",
                                 "train.precision=fp32", "generation.dtype=fp32"]))

    async def scenario():
        chats = ChatModels(Workspace(workspace), capacity=1)
        checkpoint = await chats.app_for("tiny", "checkpoint-2", False)
        engine = checkpoint.state.engine
        assert isinstance(engine.model, PeftModel) and engine.info["adapter_dir"].endswith("checkpoints/checkpoint-2")
        final, base = await chats.app_for("tiny", None, False), await chats.app_for("tiny", None, True)
        assert final.state.engine is engine and base.state.engine is engine and chats.base_copies == 1
        assert engine.models["tiny/base"].adapter is None and engine.models["tiny"].adapter != engine.models[
            "tiny/checkpoint-2"].adapter
        assert chats.loaded == [("tiny", "checkpoint-2", False), ("tiny", None, False), ("tiny", None, True)]
        weights = weakref.ref(engine.model)
        other = await chats.app_for("other-base", None, False)
        assert other.state.engine is not engine and chats.loaded == [("other-base", None, False)]
        for _ in range(50):  # the release waits for the engine to be idle: it is
            await asyncio.sleep(0.05)
            gc.collect()
            if weights() is None:
                break
        assert weights() is None and engine.model is None

    asyncio.run(scenario())


def test_a_token_a_browser_cannot_send_refuses_to_start(workspace):
    with pytest.raises(RunError, match=r"^loraft ui: the token must be printable ASCII \(a browser cannot send other "
                                       r"characters in a header\)$"):
        serve_ui(workspace, token="密钥")


def test_a_preview_larger_than_the_page_draws_is_refused(client):
    assert_refused(client.post("/api/data/preview", json={"path": "data/train.jsonl", "model": "base", "limit": 201}),
                   400, "limit must be at most 200 (got 201)")
