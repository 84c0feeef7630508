"""The FastAPI application (routes, errors, queue admission) and `serve`, which loads a run and runs it under
uvicorn; the response objects and the event stream are in loraft.serve.wire."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraft.errors import RunError
from loraft.generate import Answer
from loraft.serve.engine import (
    Engine, QueueFull, QueuePlace, Served, Use, cut_at_stop,
)
from loraft.serve.validation import (
    APIError, HostRule, check_api_key, check_content_type, check_messages, check_model, check_prompt,
    check_sampling, check_stop, check_stream, fit_context, host_rule, read_json_body,
)
from loraft.serve.wire import ResponseShape, completion_usage, event_stream, sse
from loraft.templates import RAW_TEXT, Template

logger = logging.getLogger("loraft")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access rules of the server.

    host/port/allowed_hosts decide which Host headers are answered (see validation.host_rule); port None
    checks no port (an in-process client).
    """

    api_key: Optional[str] = None
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1 << 20
    host: str = "127.0.0.1"
    port: Optional[int] = None
    allowed_hosts: tuple[str, ...] = ()


class HostCheck:
    """ASGI middleware: answer only requests whose Host header the rule allows (before any route runs)."""

    def __init__(self, app, rule: HostRule):
        self.app, self.rule = app, rule

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
            try:
                self.rule.check(header)
            except APIError as exc:
                await exc.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def shutting_down() -> APIError:
    """What a request cancelled by the shutdown timeout is told."""
    return APIError(503, "The server is shutting down; this request was cancelled.", code="server_shutting_down",
                    error_type="server_error")


def queue_full(full: QueueFull) -> APIError:
    """What a request turned away by a full queue is told: 429, and when to retry."""
    return APIError(429, f"The server is busy: {full.waiting} requests are queued (limit {full.limit}). "
                         f"Retry after {full.retry_after} s.", code="queue_full", error_type="rate_limit_error",
                    headers={"Retry-After": str(full.retry_after)})


class GenerationStream(StreamingResponse):
    """A streamed answer that gives up its queue place and stops its generation however the response ends:
    finished, the client gone (Starlette cancels the body), or the server stopping. The body iterator may
    never start when the client leaves at once, so its own cleanup cannot be relied on for this."""

    def __init__(self, content, place: QueuePlace, cancel: threading.Event, use: "Use", **kwargs):
        super().__init__(content, **kwargs)
        self.place, self.cancel, self.use = place, cancel, use

    async def __call__(self, scope, receive, send) -> None:
        sent = {"start": False, "end": False}

        async def tracking_send(message) -> None:
            if message["type"] == "http.response.start":
                sent["start"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["end"] = True
            await send(message)

        try:
            await super().__call__(scope, receive, tracking_send)
        except asyncio.CancelledError:
            # uvicorn cancels what is left once shutdown_timeout has passed: end the stream saying why (the
            # process may exit before it is sent) instead of letting uvicorn log the cancellation as a traceback
            self.cancel.set()
            if not sent["start"]:
                await shutting_down().response()(scope, receive, send)
            elif not sent["end"]:
                await send({"type": "http.response.body", "body": sse(shutting_down().body()).encode(),
                            "more_body": False})
        finally:
            self.place.release()
            self.cancel.set()
            self.use.release()


def chat_page() -> str:
    """The chat page shipped in the package (inline CSS and JS, no external assets)."""
    return resources.files("loraft").joinpath("static/chat.html").read_text(encoding="utf-8")


async def _client_gone(request: Request) -> None:
    """Return once the client disconnects (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work, cancel: threading.Event) -> Optional[Answer]:
    """The result of `work` (an Engine.complete), or None when the client disconnects first; then, or when
    this request is cancelled (server shutdown), the generation stops at its next token."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            cancel.set()
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


def create_app(engine: Engine, settings: ServeSettings = ServeSettings(), live=None, only: Optional[str] = None):
    """The FastAPI application serving `engine` under `settings`; `live` (loraft.serve.adapters.LiveAdapters) turns
    on vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter; `only` answers for that one of the engine's models
    (the UI's chat app for one run, on an engine it shares with other runs of the base)."""

    def names() -> list[str]:
        return engine.names if only is None else [name for name in engine.names if name == only]

    def lookup(name: str) -> Optional[Served]:
        return engine.lookup(name) if only is None or name == only else None

    app = FastAPI(title="loraft", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    rule = host_rule(settings.host, settings.port, settings.allowed_hosts)
    if rule is not None:
        app.add_middleware(HostCheck, rule=rule)
    # the key as bytes: argv may carry non-UTF-8 bytes, which Python holds as surrogate escapes
    api_key = settings.api_key.encode("utf-8", "surrogateescape") if settings.api_key is not None else None

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), error_type=error_type, headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return APIError(400, "Invalid request.").response()

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):  # our bug: keep the traceback in the log
        logger.exception("unexpected error while serving a request")
        return APIError(500, "The server hit an internal error.", error_type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is not None:
            check_api_key(request.scope["headers"], api_key)

    def model_card(served) -> dict:
        return {
            "id": served.name, "object": "model", "created": served.created, "owned_by": "loraft",
            "loraft": {"template": served.template.name, "base_model": served.info.get("base_model"),
                       "adapter": served.adapter is not None, "max_tokens_cap": settings.max_tokens_cap,
                       "context_length": engine.context_length},
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "generating": engine.active_generations, "waiting": engine.waiting}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page())

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(engine.models[name]) for name in names()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        served = lookup(model_id)
        if served is None:
            raise APIError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
        return model_card(served)

    async def parse(request: Request) -> tuple[dict, Served]:
        authorize(request)
        check_content_type(request.headers.get("content-type"))
        payload = await read_json_body(request, settings.max_body_bytes)
        served = lookup(check_model(payload, names()))
        if served is None:  # unloaded meanwhile
            raise APIError(404, f"The model '{payload['model']}' does not exist.", param="model",
                           code="model_not_found")
        return payload, served

    async def generate(request: Request, payload: dict, served: Served, messages: list[dict], template: Template,
                       prompt_param: str, shape: ResponseShape):
        sampling = check_sampling(payload, served.defaults, settings.max_tokens_cap)
        stops = check_stop(payload)
        stream, include_usage = check_stream(payload)
        try:
            place: Optional[QueuePlace] = engine.reserve()
        except QueueFull as full:
            raise queue_full(full) from None
        use: Optional[Use] = engine.hold(served)  # an unload of this model waits for this request
        cancel = threading.Event()
        try:
            prompt_ids = await engine.tokenize_prompt(messages, template, served.tokenizer)
            prompt_tokens = len(prompt_ids)
            if not prompt_tokens:  # a tokenizer that drops whitespace-only text: nothing to continue from
                verb = "encode" if prompt_param == "messages" else "encodes"
                raise APIError(400, f"The {prompt_param} {verb} to no tokens.", param=prompt_param)
            generation = fit_context(sampling, prompt_tokens, engine.context_length, prompt_param)
            if stream:
                events = event_stream(served, engine.stream(prompt_ids, template, generation, sampling.seed, stops,
                                                             place, cancel, served),
                                      stops, shape, prompt_tokens, include_usage)
                response = GenerationStream(events, place, cancel, use, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                place = use = None  # the response owns them now
                return response
            result = await _unless_client_leaves(
                request, engine.complete(prompt_ids, template, generation, sampling.seed, stops, place, cancel,
                                         served),
                cancel)
        except asyncio.CancelledError:
            # uvicorn cancels what is left once shutdown_timeout has passed; answer that instead of its plain 500
            raise shutting_down() from None
        finally:
            if place is not None:
                place.release()
            if use is not None:
                use.release()
        if result is None:  # nobody is there to read this; the access log shows nginx's "client closed request"
            return Response(status_code=499)
        text, stopped = cut_at_stop(result.text, stops)
        completion_tokens, finish = completion_usage(served, result, text, stopped)
        return shape.whole(text, finish, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens})

    async def live_request(request: Request) -> dict:
        authorize(request)
        if live is None:
            raise APIError(404, "Loading adapters while serving is off: start the server with --adapters-dir DIR.",
                           code="live_loading_off", error_type="not_found_error")
        check_content_type(request.headers.get("content-type"))
        payload = await read_json_body(request, settings.max_body_bytes)
        unknown = sorted(set(payload) - {"lora_name", "lora_path", "load_inplace"})
        if unknown:
            raise APIError(400, f"Unknown field {unknown[0]!r}.", param=unknown[0])
        return payload

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        payload = await live_request(request)
        if payload.get("load_inplace") not in (None, False):
            raise APIError(400, "load_inplace is not supported: unload the adapter, then load it.",
                           param="load_inplace")
        served = await live.load(payload.get("lora_name"), payload.get("lora_path"))
        return {"status": "loaded", "lora_name": served.name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        payload = await live_request(request)
        if "lora_path" in payload:
            raise APIError(400, "Unknown field 'lora_path'.", param="lora_path")
        waited = await live.unload(payload.get("lora_name"))
        return {"status": "unloaded", "lora_name": payload["lora_name"], "waited_for_requests": waited}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        payload, served = await parse(request)
        messages = check_messages(payload)
        return await generate(request, payload, served, messages, served.template, "messages",
                              ResponseShape(served.name, chat=True))

    @app.post("/v1/completions")
    async def completions(request: Request):
        payload, served = await parse(request)
        prompt = check_prompt(payload)
        return await generate(request, payload, served, [{"role": "user", "content": prompt}], RAW_TEXT, "prompt",
                              ResponseShape(served.name, chat=False))

    return app


def run_uvicorn(app, host: str, port: int, shutdown_timeout: float, log_level: str, what: str) -> None:
    """Serve `app` under uvicorn until Ctrl-C / SIGTERM (`loraft serve`, `loraft ui`); an address that cannot be
    bound is one sentence naming `what` could not start."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=shutdown_timeout))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        if exc.code not in (0, None):
            raise RunError(f"{host}:{port}: cannot start {what} (is the address in use?)") from None
        raise
