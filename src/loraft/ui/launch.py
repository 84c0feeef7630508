"""Starting, resuming and stopping training runs from the UI: always `python -m loraft.cli train ...`, detached.

A run is started as its own process in a session of its own (closing the page or stopping the UI does not touch
it), its output appended to the run directory's `console.log` (never a pipe: nobody has to read it for the run to go
on). The config is loaded with every override and checked here (Workspace.confine_config: every path in the
workspace, no model code) before anything starts, so a bad key is the request's 400, not a failed run; the trainer is
then launched from the UI's own copy of that checked config (`.loraft-ui/runs/NAME.checked.yaml`), never from a file
it would read unchecked (a config file edited meanwhile, or a stopped run's `config.yaml`). The command a user would
type for the same run is what the page shows. What the UI started is kept in a launch record
(`.loraft-ui/runs/NAME.json`: each start's argv, pid and time); the run's status is always read from its directory.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from loraft.config import RunConfig, load_config, save_config
from loraft.errors import ConfigError, RunError
from loraft.files import write_json_atomically
from loraft.presets import preset_names, preset_path
from loraft.liveness import stop_run as liveness_stop_run
from loraft.rundir import RunDir, local_time
from loraft.ui.workspace import LIVE_STATUSES, RequestError, Workspace, refused

logger = logging.getLogger("loraft")

LORAFT_CLI = [sys.executable, "-m", "loraft.cli"]
DEMO = "demo"
DEMO_DATA = "demo-data"
# one launch at a time: the check that a name is free and the start that takes it happen together
_LAUNCH_LOCK = threading.Lock()


def display_command(argv: list[str]) -> str:
    """An argv of `python -m loraft.cli ...` as the shell command a user types: `loraft ...`, shell-quoted."""
    if argv[:len(LORAFT_CLI)] == LORAFT_CLI:
        argv = ["loraft", *argv[len(LORAFT_CLI):]]
    return shlex.join(argv)


def _child_environment() -> dict:
    """The UI's environment for what it starts, without the UI's token: a run has no use for it, and its
    environment is readable by anything that can read /proc/PID/environ."""
    environment = {key: value for key, value in os.environ.items() if key != "LORAFT_UI_TOKEN"}
    return {**environment, "PYTHONUNBUFFERED": "1"}


def spawn_detached(argv: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start `argv` in a session of its own, its output appended to `log_path`, reaped by a daemon thread.

    The new session keeps Ctrl-C in the UI's terminal (and the UI's end) away from the process; the reaper keeps
    it from lingering as a zombie while this UI lives. A UI started later is not its parent and reads its
    liveness from the run directory's lock.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n[{local_time()}] {display_command(argv)}\n".encode("utf-8", "surrogateescape"))
        log.flush()
        process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=_child_environment())
    threading.Thread(target=process.wait, name=f"loraft-ui-reap-{process.pid}", daemon=True).start()
    return process


@dataclass(frozen=True)
class TrainCommand:
    """A checked `loraft train` start: the command a user would type, the config it loads to, and the YAML text to
    keep."""

    argv: list[str]  # `python -m loraft.cli train SOURCE OVERRIDES output_dir=...`, as a user would type it
    config: RunConfig  # what that command loads, every override applied, checked by Workspace.confine_config
    yaml_text: Optional[str]  # submitted YAML, written to .loraft-ui/runs/NAME.yaml before the start
    source: str  # preset NAME, file PATH, yaml, or demo


def _check_overrides(overrides: object) -> list[str]:
    if overrides is None:
        return []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise refused("overrides must be a list of strings like \"train.max_steps=3\"")
    for override in overrides:
        if override.partition("=")[0].strip() == "output_dir":
            raise refused(f"overrides: {override!r} is not allowed; the run's directory is WORKSPACE/NAME, "
                          "set by its name")
    return overrides


def _demo_overrides(workspace: Workspace) -> list[str]:
    """The demo's base (shipped with loraft) and its data, copied once into WORKSPACE/demo-data/, as overrides so
    that the command shown is the command run: in the workspace, they are checked like any other path."""
    from loraft.demo.base import build_demo_base
    from loraft.demo.tasks import write_demo_data
    from loraft.files import staged_directory

    data_dir = workspace.root / DEMO_DATA
    if not (data_dir / "train.jsonl").is_file() or not (data_dir / "heldout.jsonl").is_file():
        write_demo_data(data_dir)
    base = data_dir / "base"
    if not (base / "config.json").is_file():
        with staged_directory(base, keep_existing=True) as staging:  # two starts at once copy it once
            shutil.copytree(build_demo_base(log=logger.info), staging, dirs_exist_ok=True)
    return [f"model.name_or_path={base}", f"data.path={data_dir / 'train.jsonl'}"]


def _load(path: Path, overrides: list[str], shown_as: Optional[str] = None) -> RunConfig:
    """load_config, its sentence naming `shown_as` instead of a file the user never wrote (submitted YAML)."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        message = str(exc)
        if shown_as is not None:
            message = message.replace(str(path), shown_as)
        raise ConfigError(message) from None


def train_command(workspace: Workspace, config: object, overrides: object, name: Optional[str]) -> TrainCommand:
    """The `loraft train` a request asks for, validated: `config` is a preset name (`demo` also brings the demo's
    base and data), a workspace-relative .yaml/.yml file, or YAML text; `output_dir` is WORKSPACE/NAME.

    Raises:
        RequestError (400) for a malformed request, ConfigError (400) for a config that does not load.
    """
    if not isinstance(config, str) or not config.strip():
        raise refused("config must be a preset name, a .yaml file in the workspace, or YAML text")
    overrides = _check_overrides(overrides)
    run_dir = workspace.root / (name or "NAME")
    extra: list[str] = []
    yaml_text = None
    text = config.strip()
    if text == DEMO:
        extra = _demo_overrides(workspace)
    if text in preset_names():
        # a file of that name in the workspace would be read instead (resolve_config_source): name the preset's file
        config_arg = text if not (workspace.root / text).exists() else str(preset_path(text))
        config_file, source = preset_path(text), DEMO if text == DEMO else f"preset {text}"
    elif "\n" not in text and text.endswith((".yaml", ".yml")):
        config_file = workspace.resolve(text, field="config")
        config_arg, source = str(config_file), f"file {text}"
    else:
        yaml_text, source = config, "yaml"
        config_file = workspace.submitted_yaml(name or "NAME")  # where start_run keeps it
        config_arg = str(config_file)
    every_override = [*extra, *overrides, f"output_dir={run_dir}"]
    if yaml_text is None:
        resolved = _load(config_file, every_override)
    else:
        # load_config reads a file: the text goes to a scratch file, the sentence names "config"
        workspace.ui_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=workspace.ui_dir, encoding="utf-8",
                                         delete=False) as scratch:
            scratch.write(yaml_text)
        try:
            resolved = _load(Path(scratch.name), every_override, "config")
        finally:
            os.unlink(scratch.name)
    workspace.confine_config(resolved)  # after every override: what the run would read, wherever it came from
    argv = [*LORAFT_CLI, "train", config_arg, *every_override]
    return TrainCommand(argv=argv, config=resolved, yaml_text=yaml_text, source=source)


def _planned(workspace: Workspace, config: object, overrides: object, name: Optional[str]) -> tuple[TrainCommand, dict]:
    """train_command, and `loraft plan --json`'s report for it on this machine: the plan matches the adapter's
    target patterns against the model's modules, as the trainer will."""
    from loraft.train import preview_plan

    command = train_command(workspace, config, overrides, name)
    return command, preview_plan(workspace.confine_config(command.config), measure=False)


def plan_preview(workspace: Workspace, config: object, overrides: object, name: Optional[str]) -> dict:
    """POST /api/plan: the exact command and `loraft plan --json`'s report for it on this machine."""
    if name is not None:
        workspace.check_new_name(name)
    command, report = _planned(workspace, config, overrides, name)
    return {"command": command.argv, "command_text": display_command(command.argv),
            "plan": {key: value for key, value in report.items() if key != "describe"}}


def start_check(workspace: Workspace, config: object, overrides: object, name: Optional[str]) -> TrainCommand:
    """What a start checks before it launches (in a worker, with its time limit): the config and its plan. So a
    target pattern that matches nothing is the start's sentence, and one that backtracks for ever is stopped here,
    not in a run that hangs."""
    return _planned(workspace, config, overrides, name)[0]


def _record_start(workspace: Workspace, name: str, kind: str, argv: list[str], pid: int, command: list[str],
                  fields: Optional[dict] = None) -> None:
    # a new run (its name may be a deleted run's) starts a new record; a resume adds to its run's
    launch = workspace.read_launch(name) if kind != "train" else {}
    launch.update({"name": name, "host": socket.gethostname(), **(fields or {})})
    launch.pop("stop_requested_at", None)
    launch["starts"] = [*launch.get("starts", []), {"kind": kind, "argv": argv, "command": command, "pid": pid,
                                                    "started_at": local_time()}]
    path = workspace.launch_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, launch)


def run_here(function: Callable, *args):
    """How a check runs when no worker process is given (the CLI, in-process tests): in this process."""
    return function(*args)


def live_runs(workspace: Workspace) -> int:
    """How many runs in the workspace are starting or running now (a run that cannot be read counts as not)."""
    return sum(run["status"] in (*LIVE_STATUSES, "running?") for run in workspace.list_runs())


def _check_capacity(workspace: Workspace, max_runs: Optional[int]) -> None:
    if max_runs is None:
        return
    if max_runs <= 0:
        raise RequestError(429, "this UI does not start runs (loraft ui --max-runs 0)")
    running = live_runs(workspace)
    if running >= max_runs:
        raise RequestError(429, f"{running} runs are starting or running, this UI's limit (--max-runs "
                                f"{max_runs}); stop one or wait for one to end")


def _launch(workspace: Workspace, name: str, kind: str, config: RunConfig, command: list[str],
            fields: Optional[dict] = None) -> None:
    """Start `loraft train` from the UI's own copy of `config` (checked by the caller), recording `command` (what a
    user would type for it) beside the argv that ran."""
    checked = workspace.checked_config(name)
    checked.parent.mkdir(parents=True, exist_ok=True)
    save_config(config, checked)
    argv = [*LORAFT_CLI, "train", str(checked), *(["--resume"] if kind == "resume" else [])]
    process = spawn_detached(argv, workspace.root, workspace.console_log(name))
    _record_start(workspace, name, kind, argv, process.pid, command, fields)


def start_run(workspace: Workspace, name: object, config: object, overrides: object, work: Callable = run_here,
              max_runs: Optional[int] = None) -> dict:
    """POST /api/runs: check the config (`work`: in a worker process, with a time limit), refuse a name in use
    (409) or a start past `max_runs` live runs (429), then start `loraft train` detached."""
    name = workspace.check_new_name(name)
    if name == DEMO_DATA:
        raise refused(f"name {DEMO_DATA!r} is where the demo's data is written; choose another name")
    command = work(start_check, workspace, config, overrides, name)
    with _LAUNCH_LOCK:
        run_dir = workspace.run_path(name)
        if run_dir.exists() or run_dir.is_symlink():
            raise RequestError(409, f"a run named {name!r} exists already ({run_dir}); choose another name")
        if workspace.launch_alive(name):
            raise RequestError(409, f"a run named {name!r} is starting already; choose another name")
        _check_capacity(workspace, max_runs)
        if command.yaml_text is not None:
            yaml_file = workspace.submitted_yaml(name)
            yaml_file.parent.mkdir(parents=True, exist_ok=True)
            yaml_file.write_text(command.yaml_text, encoding="utf-8")
        _launch(workspace, name, "train", command.config, command.argv,
                {"config": command.source, "base_model": command.config.model.name_or_path})
    return {"name": name}


def resume_command(workspace: Workspace, name: str) -> list[str]:
    """`loraft train RUN/config.yaml --resume`: the run's resolved config holds its output_dir."""
    return [*LORAFT_CLI, "train", str(RunDir(workspace.run_path(name)).config_file), "--resume"]


def resume_config(workspace: Workspace, name: str) -> RunConfig:
    """The config a resume of run `name` runs with: its `config.yaml` loaded and checked as a new run's is (every
    path in the workspace, no model code), and naming the run's own directory."""
    run_dir = workspace.run_dir(name)
    config = load_config(RunDir(run_dir).config_file)
    workspace.confine_config(config)
    if Path(workspace.place(config.output_dir, "output_dir", must_exist=False)) != run_dir:
        raise refused(f"run {name!r}: its config.yaml names another output_dir ({config.output_dir}); resume it with "
                      "`loraft train` on the command line")
    return config


def resume_run(workspace: Workspace, name: str, work: Callable = run_here, max_runs: Optional[int] = None) -> dict:
    """POST /api/runs/NAME/resume: a stopped, interrupted or failed run with a checkpoint (409 otherwise), its
    config checked (`work`, as start_run's) and the start within `max_runs` (429)."""

    def check_resumable() -> None:
        state = workspace.run_state(name)
        status = state["status"]
        if status in ("starting", "running", "running?"):
            raise RequestError(409, f"run {name!r} is {status}; it cannot be resumed while it runs")
        if status == "finished":
            raise RequestError(409, f"run {name!r} has finished; there is nothing to resume")
        if status not in ("stopped", "interrupted", "failed"):
            raise RequestError(409, f"run {name!r} is {status}; only a stopped, interrupted or failed run can be "
                                    "resumed")
        if not state["checkpoint"] or not RunDir(run_dir).config_file.is_file():
            raise RequestError(409, f"run {name!r} has no complete checkpoint to resume from; start it again "
                                    "under a new name")

    run_dir = workspace.run_dir(name)
    check_resumable()
    config = work(resume_config, workspace, name)
    with _LAUNCH_LOCK:
        check_resumable()  # again: another request may have resumed it while its config was checked
        _check_capacity(workspace, max_runs)
        _launch(workspace, name, "resume", config, resume_command(workspace, name))
    return {"name": name}


def stop_run(workspace: Workspace, name: str) -> dict:
    """POST /api/runs/NAME/stop: SIGTERM to the run's trainer, answered at once (the run checkpoints its step
    and records `stopped`; the page follows the status). A second stop aborts at once, as `loraft stop` run
    again. A run still starting (no record yet) is ended before it begins.
    """
    run_dir = workspace.run_dir(name)
    state = workspace.run_state(name)
    if state["status"] == "starting":
        launch = workspace.read_launch(name)
        pid = (launch.get("starts") or [{}])[-1].get("pid")
        _signal(name, pid)
        launch["stop_requested_at"] = local_time()
        write_json_atomically(workspace.launch_file(name), launch)
        return {"name": name, "status": workspace.run_state(name)["status"]}
    try:
        stopping = liveness_stop_run(run_dir, wait=False)
    except RunError as exc:  # not running, another host's, no pid, the process already gone: one sentence
        raise RequestError(409, str(exc)) from None
    return {"name": name, "status": stopping["status"]}


def _signal(name: str, pid: object) -> None:
    if not isinstance(pid, int) or pid <= 0:
        raise RequestError(409, f"run {name!r}: no process to stop")
    try:
        if os.getpgid(pid) == pid:  # it leads a session of its own (spawn_detached): its children too
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise RequestError(409, f"run {name!r}: its process (pid {pid}) has already ended") from None
    except PermissionError:
        raise RequestError(409, f"run {name!r}: not allowed to signal its process (pid {pid}, another "
                                "user's)") from None
