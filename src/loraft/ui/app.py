"""The UI's FastAPI application: the REST API of docs/ui.md, the static page, the chat pages.

Who may ask is checked before any route runs (loraft.ui.requests): the Host header by loraft.serve's rule (DNS
rebinding), a browser's Origin on anything that changes state (other sites), then the token (`X-Loraft-Token`,
compared in constant time) on /api/ and the chat API. Every refusal is a 4xx `{"error": one sentence}`; slow work
(configs, tokenizers, plans, starting processes, reading run directories) runs in worker threads, never on the
event loop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import mimetypes
import re
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Union

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import loraft
from loraft.config import RunConfig, parse_yaml
from loraft.errors import LoraftError
from loraft.presets import preset_names
from loraft.rundir import RunDir, read_record
from loraft.serve.app import HostCheck, chat_page
from loraft.serve.validation import host_rule
from loraft.ui import jobs, launch
from loraft.ui.chat import ChatModels, Forward, chat_query
from loraft.ui.data import DATA_FIELDS, data_check, data_preview
from loraft.ui.events import run_events
from loraft.ui.requests import (RequestGate, UISettings, at_least, check_fields, error, lines_query, read_body,
                                 read_payload)
from loraft.ui.work import Workers
from loraft.ui.console import tail_lines
from loraft.ui.workspace import LIST_FIELDS, RequestError, Workspace, caches, complete_checkpoints

logger = logging.getLogger("loraft")
EVENT_FILE_TAG = re.compile(r"[0-9a-f]{1,16}")
EVENT_LINE = re.compile(r"[0-9]{1,12}")  # a line number, not a 5,000-digit one


class StreamCount:
    """The event streams open now, at most `limit`: each holds a connection and polls a file (429 past it)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0

    def counted(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """`stream`, counted while a client reads it; refused (429) when `limit` streams are open already."""
        if self.open >= self.limit:
            raise RequestError(429, f"{self.open} event streams are open, this UI's limit; close a page that "
                                    "follows a run")
        self.open += 1  # on the event loop: no lock needed

        async def follow() -> AsyncIterator[str]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                self.open -= 1

        return follow()


STATIC_DIR = Path(__file__).resolve().parent / "static"  # package data (wheels install unpacked)
# what a browser must be told about the files the page is made of (mimetypes varies by system)
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".map": "application/json"}


# ------------------------------------------------------------------------------------------------- runs
def run_detail(workspace: Workspace, name: str) -> dict:
    """GET /api/runs/NAME: its state, record, resolved config, plan, data report, failure, checkpoints and the
    commands that started and would resume it."""
    run_dir = workspace.run_dir(name)
    state = workspace.run_state(name)
    record = read_record(run_dir)
    try:
        config = parse_yaml(RunDir(run_dir).config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        config = None
    try:
        data_report = json.loads(RunDir(run_dir).data_report_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data_report = None
    starts = workspace.read_launch(name).get("starts") or []
    first = next((start for start in reversed(starts) if start.get("kind") == "train"), {})
    # what a user would type for it (older launch records kept only the argv, which was that command)
    command = first.get("command") or first.get("argv")
    launched = (starts[-1] if starts else {}).get("argv")
    resume = launch.resume_command(workspace, name)
    return {
        "name": name, "state": {key: value for key, value in state.items() if key != "error"}, "record": record,
        "config": config if isinstance(config, dict) else None, "plan": record.get("plan"),
        "data_report": data_report if isinstance(data_report, dict) else None,
        "error": workspace.run_error(name, state), "checkpoints": complete_checkpoints(run_dir),
        "command": command, "command_text": launch.display_command(command) if command else None,
        "launched_command": launched,
        "resume_command": resume, "resume_command_text": launch.display_command(resume),
    }


def run_log(workspace: Workspace, name: str, lines: int) -> dict:
    run_dir = workspace.run_dir(name)
    return {"train_log": tail_lines(RunDir(run_dir).log_file, lines),
            "console": tail_lines(workspace.console_log(name), lines)}


def run_completions(workspace: Workspace, name: str, lines: int) -> dict:
    """A GRPO run's newest sampled completions (completions.jsonl: step, prompt, completion, rewards, advantage);
    [] for a run that logs none. A line cut off by a crash is skipped."""
    rows = []
    for line in tail_lines(RunDir(workspace.run_dir(name)).completions_file, lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(_finite(row))
    return {"completions": rows}


def _finite(value):
    """`value` with every non-finite float as None: the JSON answer has no NaN (a file written by hand may)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def listed_state(workspace: Workspace, name: str) -> dict:
    state = workspace.run_state(name)
    return {field: state.get(field) for field in LIST_FIELDS}


JOB_FIELDS = {"eval": {"kind": (str, True), "data": (str, True), "base": (bool, False), "limit": (int, False)},
              "merge": {"kind": (str, True), "dtype": (str, False)},
              "export": {"kind": (str, True), "outtype": (str, False)}}


def job_options(workspace: Workspace, values: dict) -> dict:
    """A job's options checked against the CLI's choices; eval's data resolved in the workspace."""
    kind = values["kind"]
    if kind == "eval":
        at_least(values, "limit", 1)
        return {**values, "data": workspace.resolve(values["data"], field="data")}
    if kind == "merge" and values.get("dtype") not in (None, *jobs.MERGE_DTYPES):
        raise RequestError(400, f"dtype must be one of {', '.join(jobs.MERGE_DTYPES)} (got {values['dtype']!r})")
    if kind == "export":
        from loraft.export.gguf import OUTTYPES

        if values.get("outtype") not in (None, *OUTTYPES):
            raise RequestError(400, f"outtype must be one of {', '.join(OUTTYPES)} (got {values['outtype']!r})")
    return values


# --------------------------------------------------------------------------------------------- the app
def languages() -> list[str]:
    """The page's languages: its translation files (en and zh-CN ship)."""
    folder = STATIC_DIR / "i18n"
    found = sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []
    return found or ["en", "zh-CN"]


def static_file(relative: str) -> Optional[Path]:
    """A file of the page under ui/static, or None (outside it, hidden, or missing)."""
    if not relative or "\0" in relative or any(part.startswith(".") for part in Path(relative).parts):
        return None
    root = STATIC_DIR.resolve()
    try:
        path = (root / relative).resolve()
        return path if root in path.parents and path.is_file() else None
    except OSError:  # a name too long for the file system
        return None


def file_response(path: Path) -> FileResponse:
    media_type = (CONTENT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
                  or "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})


def create_app(workspace: Union[str, Path, Workspace], settings: UISettings = UISettings()) -> FastAPI:
    """The UI's application over `workspace` (see docs/ui.md for every route)."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace, settings.allow_hub)
    workers = Workers(workspace.root, time_limit=settings.time_limit)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if settings.warm_worker:
            workers.warm()
        yield
        workers.close()

    app = FastAPI(title="loraft ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.workspace = workspace
    app.state.kernel_confinement = None  # serve_ui sets the Landlock ABI it applied
    chats = ChatModels(workspace, max_loading=settings.max_chat_loads)
    streams = StreamCount(settings.max_streams)

    def work(what: str) -> Callable:
        """Run a function in a worker process (launch.start_run's and resume_run's `work`)."""
        return functools.partial(workers.run, what)
    app.add_middleware(RequestGate, token=settings.token)
    rule = host_rule(settings.host, settings.port, settings.allowed_hosts)
    if rule is not None:  # added last: it runs first, before the token is looked at
        app.add_middleware(HostCheck, rule=rule)

    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(LoraftError)
    async def loraft_error(_request, exc: LoraftError):
        return error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error(404, f"{request.url.path}: no such page or API route")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        where = ".".join(str(part) for part in exc.errors()[0]["loc"]) if exc.errors() else "the request"
        return error(400, f"{where} is not valid")

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):  # our bug: keep the traceback in the log
        logger.exception("unexpected error while answering a UI request")
        return error(500, "the UI hit an internal error (a bug in loraft: see the UI's log)")

    # --- the page ---------------------------------------------------------------------------------------
    @app.get("/")
    async def index():
        page = static_file("index.html")
        if page is None:
            raise RequestError(404, f"the UI's page is not installed ({STATIC_DIR / 'index.html'} is missing)")
        return file_response(page)

    @app.get("/static/{relative:path}")
    async def static(relative: str):
        path = static_file(relative)
        if path is None:
            raise RequestError(404, f"/static/{relative}: no such file")
        return file_response(path)

    # --- workspace ----------------------------------------------------------------------------------------
    @app.get("/api/health")
    async def health():  # answered on the event loop, no thread: what says the UI is still answering
        return {"ok": True}

    @app.get("/api/info")
    async def info():
        yaml_files = await run_in_threadpool(workspace.yaml_files)
        model_files = await run_in_threadpool(workspace.model_files)
        return {"workspace": str(workspace.root), "version": loraft.__version__,
                "token_required": settings.token is not None, "presets": preset_names(), "yaml_files": yaml_files,
                "model_files": model_files,
                "languages": languages(), "allow_hub": workspace.allow_hub, "caches": [str(path) for path in caches()],
                "kernel_confinement": app.state.kernel_confinement,
                # what chat holds in memory: base copies, and the chat models on them ([run, checkpoint, base])
                "chat": {"base_copies": chats.base_copies, "models": chats.loaded}}

    @app.get("/api/schema")
    async def schema():
        return RunConfig.model_json_schema()

    # --- runs ---------------------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def runs():
        return await run_in_threadpool(workspace.list_runs)

    @app.post("/api/runs", status_code=202)
    async def new_run(request: Request):
        values = await read_body(request, {"name": (str, True), "config": (str, True), "overrides": (list, False)})
        return await run_in_threadpool(launch.start_run, workspace, values["name"], values["config"],
                                       values["overrides"], work("the config check"), settings.max_runs)

    @app.post("/api/plan")
    async def plan(request: Request):
        values = await read_body(request, {"config": (str, True), "overrides": (list, False), "name": (str, False)})
        return await run_in_threadpool(workers.run, "the plan", launch.plan_preview, workspace, values["config"],
                                       values["overrides"], values["name"])

    @app.get("/api/runs/{name:path}/log")
    async def log(name: str, request: Request):
        return await run_in_threadpool(run_log, workspace, name, lines_query(request, 200))

    @app.get("/api/runs/{name:path}/completions")
    async def completions(name: str, request: Request):
        return await run_in_threadpool(run_completions, workspace, name, lines_query(request, 8))

    @app.get("/api/runs/{name:path}/events")
    async def events(name: str, request: Request):
        run_dir = await run_in_threadpool(workspace.run_dir, name)
        header = request.headers.get("last-event-id", "").strip()
        line, _, file_tag = header.partition("-")  # LINE-FILE as the stream sent it; a bare LINE too
        if header and not (EVENT_LINE.fullmatch(line) and (not file_tag or EVENT_FILE_TAG.fullmatch(file_tag))):
            shown = header if len(header) <= 40 else header[:40] + "..."
            raise RequestError(400, f"Last-Event-ID must be an id this stream sent, LINE-FILE (got {shown!r})")
        stream = run_events(RunDir(run_dir).metrics_file, lambda: listed_state(workspace, name), int(line or 0),
                            file_tag or None)
        return StreamingResponse(streams.counted(stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/runs/{name:path}/stop", status_code=202)
    async def stop(name: str, request: Request):
        await read_body(request, {})
        return await run_in_threadpool(launch.stop_run, workspace, name)

    @app.post("/api/runs/{name:path}/resume", status_code=202)
    async def resume(name: str, request: Request):
        await read_body(request, {})
        return await run_in_threadpool(launch.resume_run, workspace, name, work("the config check"),
                                       settings.max_runs)

    @app.post("/api/runs/{name:path}/jobs", status_code=202)
    async def new_job(name: str, request: Request):
        payload = await read_payload(request)
        kind = payload.get("kind")
        if not isinstance(kind, str) or kind not in JOB_FIELDS:
            shown = "missing" if kind is None else repr(kind)
            raise RequestError(400, f"kind must be one of {', '.join(JOB_FIELDS)} (got {shown})")
        options = await run_in_threadpool(job_options, workspace, check_fields(payload, JOB_FIELDS[kind]))
        return await run_in_threadpool(jobs.start_job, workspace, name, kind, options, settings.max_jobs)

    @app.get("/api/runs/{name:path}")
    async def run(name: str):
        return await run_in_threadpool(run_detail, workspace, name)

    # --- jobs ---------------------------------------------------------------------------------------------
    @app.get("/api/jobs")
    async def job_list(request: Request):
        run_name = request.query_params.get("run")
        return await run_in_threadpool(jobs.list_jobs, workspace, run_name)

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str, request: Request):
        return await run_in_threadpool(jobs.job_state, workspace, job_id, lines_query(request, 100))

    # --- data ---------------------------------------------------------------------------------------------
    @app.post("/api/data/check")
    async def check(request: Request):
        values = await read_body(request, DATA_FIELDS)
        at_least(values, "max_length", 2)
        return await run_in_threadpool(workers.run, "the data check", data_check, workspace, values)

    @app.post("/api/data/preview")
    async def preview(request: Request):
        values = await read_body(request, {**DATA_FIELDS, "model": (str, True), "limit": (int, False)})
        at_least(values, "max_length", 2)
        at_least(values, "limit", 1)
        return await run_in_threadpool(workers.run, "the data preview", data_preview, workspace, values)

    # --- chat ---------------------------------------------------------------------------------------------
    @app.api_route("/chat/{name:path}/v1/{rest:path}", methods=["GET", "POST"])
    async def chat_api(name: str, rest: str, request: Request):
        checkpoint, base = chat_query(request.query_params.get("checkpoint"), request.query_params.get("base"))
        chat_app = await chats.app_for(name, checkpoint, base)
        return Forward(chat_app, f"/chat/{name}")

    @app.get("/chat/{name:path}/")
    async def chat(name: str):
        workspace.run_path(name)  # a malformed name is refused; the page itself holds no data
        return HTMLResponse(chat_page(), headers={"Cache-Control": "no-cache"})

    @app.get("/chat/{name:path}")
    async def chat_without_slash(name: str, request: Request):
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{request.url.path}/{query}", status_code=307)

    return app
