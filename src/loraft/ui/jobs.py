"""Eval, merge and export from the UI: each one `loraft` command, detached, whose outcome outlives the UI.

A job lives in `WORKSPACE/.loraft-ui/jobs/ID/`: `job.json` (kind, run, argv, started_at, pid), `console.log` (the
command's output) and `result.json` ({exit_code, ended_at}), which the job's own process writes when the command
ends: `python -m loraft.ui.jobs JOB_DIR -- ARGS` (this module's `main`) runs `python -m loraft.cli ARGS` and waits
for it. So a UI restarted meanwhile still tells finished from failed from interrupted (the process gone without a
result: killed, or the machine went down).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

from loraft.errors import RunError
from loraft.files import write_json_atomically, write_text_atomically
from loraft.rundir import EVAL_METRICS, RunDir, local_time
from loraft.run_access import open_run
from loraft.ui.launch import _LAUNCH_LOCK, LORAFT_CLI, display_command, spawn_detached
from loraft.ui.console import last_error_line, process_alive, tail_lines
from loraft.ui.workspace import RequestError, Workspace

JOB_KINDS = ("eval", "merge", "export")
MERGE_DTYPES = ("bf16", "fp16", "fp32")  # `loraft merge --dtype` choices
JOB_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[a-z]+-[0-9a-f]{4}")


def merge_out_dir(run_dir: Path) -> Path:
    """Where a merge job writes the standalone model: NAME-merged beside the run."""
    return run_dir.parent / f"{run_dir.name}-merged"


def job_command(kind: str, run_dir: Path, options: dict) -> tuple[list[str], Optional[Path]]:
    """(the loraft arguments of a job, the directory it creates or None) from its checked options."""
    if kind == "eval":
        args = ["eval", str(run_dir), "--data", str(options["data"])]
        if options.get("base"):
            args.append("--base")
        if options.get("limit") is not None:
            args += ["--limit", str(options["limit"])]
        return args, None
    if kind == "merge":
        out = merge_out_dir(run_dir)
        return ["merge", str(run_dir), "--out", str(out), "--dtype", options.get("dtype") or "fp32"], out
    from loraft.export.gguf import default_out_dir

    out = default_out_dir(run_dir, adapter_only=False)
    return ["export", str(run_dir), "--format", "gguf", "--outtype", options.get("outtype") or "f16"], out


def start_job(workspace: Workspace, name: str, kind: str, options: dict, max_jobs: Optional[int] = None) -> dict:
    """POST /api/runs/NAME/jobs: check the run is finished, its config confined to the workspace (the job loads its
    base model) and the output free, then start the job detached.

    Raises:
        RequestError: 409 for a run that is not finished, an output directory that exists, or the same job
            already running on the run; 400 for a run whose config reaches outside the workspace; 429 past
            `max_jobs` running jobs.
    """
    run_dir = workspace.run_dir(name)
    status = workspace.run_state(name)["status"]
    if status != "finished":
        raise RequestError(409, f"run {name!r} is {status}; {kind} needs a finished run")
    try:
        run = open_run(run_dir)
    except RunError as exc:
        raise RequestError(409, str(exc)) from None
    workspace.confine_config(run.config)
    with _LAUNCH_LOCK:  # the check that no such job runs and the start that makes one, together
        running = [job for job in list_jobs(workspace) if job["status"] == "running"]
        for job in running:
            if job["run"] == name and job["kind"] == kind:
                raise RequestError(409, f"a {kind} job of run {name!r} is running already (job {job['id']})")
        if max_jobs == 0:
            raise RequestError(429, "this UI does not start jobs (loraft ui --max-jobs 0)")
        if max_jobs is not None and len(running) >= max_jobs:
            raise RequestError(429, f"{len(running)} jobs are running, this UI's limit (--max-jobs {max_jobs}); "
                                    "wait for one to end")
        args, out = job_command(kind, run_dir, options)
        if out is not None and out.exists():
            raise RequestError(409, f"{out} exists already; move or delete it to {kind} run {name!r} again")
        job_id = f"{datetime.now():%Y%m%d-%H%M%S}-{kind}-{secrets.token_hex(2)}"
        job_dir = workspace.jobs_dir() / job_id
        job_dir.mkdir(parents=True)
        process_argv = [sys.executable, "-m", "loraft.ui.jobs", str(job_dir), "--", *args]
        process = spawn_detached(process_argv, workspace.root, job_dir / "console.log")
        write_json_atomically(job_dir / "job.json", {
            "id": job_id, "kind": kind, "run": name, "argv": [*LORAFT_CLI, *args], "started_at": local_time(),
            "pid": process.pid, "process_argv": process_argv, "out_dir": str(out) if out else None})
    return {"id": job_id}


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _result(workspace: Workspace, job: dict) -> Optional[object]:
    """A finished job's outcome: eval's metrics, the merged model's folder, or the export's report."""
    if job.get("kind") == "eval":  # this job's own copy: a later eval of the run rewrites RUN/eval
        return _read_json(workspace.jobs_dir() / job["id"] / EVAL_METRICS)  # a copy of RUN/eval's, taken at its end
    out_dir = Path(job["out_dir"]) if job.get("out_dir") else None
    if out_dir is None or not out_dir.is_dir() or not workspace.inside(out_dir):
        return None
    if job.get("kind") == "merge":
        return {"out_dir": out_dir.relative_to(workspace.root).as_posix()}
    from loraft.export.gguf import REPORT_FILE

    report = out_dir / REPORT_FILE
    return _read_json(report) if workspace.inside(report) else None


def job_state(workspace: Workspace, job_id: str, console_lines: int = 100) -> dict:
    """GET /api/jobs/ID: the job as it is now; 404 for an unknown id.

    Returns:
        {"id", "kind", "run", "command", "command_text", "status" (running, finished, failed, interrupted),
        "exit_code", "started_at", "ended_at", "console" (its last lines), "result", "error"}.
    """
    job_dir = workspace.jobs_dir() / job_id
    if JOB_ID.fullmatch(job_id) and job_dir.is_dir():
        workspace.check_tree(job_dir, f"job {job_id!r}", depth=1)  # its files are read by name
    job = _read_json(job_dir / "job.json") if JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise RequestError(404, f"no job {job_id!r} in the workspace")
    result = _read_json(job_dir / "result.json")
    if result is not None:
        status = "finished" if result.get("exit_code") == 0 else "failed"
    else:
        status = "running" if process_alive(job.get("pid"), job.get("process_argv")) else "interrupted"
    console = job_dir / "console.log"
    return {
        "id": job_id, "kind": job.get("kind"), "run": job.get("run"), "command": job.get("argv"),
        "command_text": display_command(job.get("argv") or []), "status": status,
        "exit_code": (result or {}).get("exit_code"), "started_at": job.get("started_at"),
        "ended_at": (result or {}).get("ended_at"), "console": tail_lines(console, console_lines),
        "result": _result(workspace, job) if status == "finished" else None,
        "error": last_error_line(console) if status in ("failed", "interrupted") else None,
    }


def list_jobs(workspace: Workspace, run: Optional[str] = None) -> list[dict]:
    """GET /api/jobs: every job (of run `run`), oldest first, with the last 20 lines of their console."""
    folder = workspace.jobs_dir()
    jobs = []
    if folder.is_dir():
        for job_dir in sorted(folder.iterdir()):
            if not JOB_ID.fullmatch(job_dir.name):
                continue
            if run is not None and (_read_json(job_dir / "job.json") or {}).get("run") != run:
                continue
            try:
                jobs.append(job_state(workspace, job_dir.name, console_lines=20))
            except RequestError:  # a job folder without its job.json: being created, or damaged
                continue
    return jobs


def main(argv: Optional[list[str]] = None) -> int:
    """The job's own process: `python -m loraft.ui.jobs JOB_DIR -- LORAFT_ARGS...`.

    Runs `python -m loraft.cli LORAFT_ARGS` (its output goes where this process's goes: the job's console.log)
    and writes JOB_DIR/result.json when it ends, atomically, so the outcome is read the same by any later UI.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m loraft.ui.jobs JOB_DIR -- LORAFT_ARGS...", file=sys.stderr)
        return 2
    job_dir, args = Path(argv[0]), argv[2:]
    exit_code = subprocess.call([*LORAFT_CLI, *args], stdin=subprocess.DEVNULL)
    if exit_code == 0 and args[:1] == ["eval"]:  # keep what this eval measured: the next one rewrites RUN/eval
        metrics = RunDir(args[1]).eval_dir / EVAL_METRICS
        write_text_atomically(job_dir / EVAL_METRICS, metrics.read_text(encoding="utf-8"))
    write_json_atomically(job_dir / "result.json", {"exit_code": exit_code, "ended_at": local_time()})
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
