"""OpenAI-compatible HTTP server for a run directory (FastAPI + uvicorn), with a small chat page at `/`.

Endpoints: POST /v1/chat/completions (applies the run's template; `stream: true` answers as server-sent
events), POST /v1/completions (raw text continuation), GET /v1/models, GET /health (with how many
requests are generating and waiting), GET / (the page). Besides OpenAI's sampling fields, requests accept
vLLM's `min_tokens`.

One model serves every request: generations run one at a time in a worker thread, queued first come
first served on an asyncio lock, so the event loop keeps accepting (and queueing) requests meanwhile and
none is dropped. Bad requests get a 4xx in OpenAI's error shape, never a 500. uvicorn's graceful shutdown
lets in-flight and queued requests finish on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraft.config import GenerationConfig
from loraft.errors import RunError
from loraft.generate import Answer, encode_prompt, generate_answers, stream_answer
from loraft.templates import ROLES, Template

logger = logging.getLogger("loraft")

# A template that adds nothing: /v1/completions continues the prompt text as it is, while reusing
# loraft.generate's encoding (BOS where the tokenizer adds one) and EOS stopping.
RAW_TEXT = Template(
    name="raw",
    description="No template: the prompt text as it is (for /v1/completions).",
    system=lambda content: content,
    user=lambda content: content,
    assistant_header="",
    assistant_end="{eos}",
    after_assistant="",
    default_system=None,
    jinja="",
)


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access rules of the server."""

    api_key: Optional[str] = None
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1 << 20


class APIError(Exception):
    """A request error reported in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class Engine:
    """The loaded run plus a FIFO lock: one generation at a time, in a worker thread."""

    def __init__(self, model, tokenizer, template: Template, model_id: str, defaults: GenerationConfig,
                 info: Optional[dict] = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.model_id = model_id
        self.defaults = defaults
        self.info = info or {}
        self.created = int(time.time())
        self.lock = asyncio.Lock()
        self._counter_lock = threading.Lock()
        self.active_generations = 0
        self.most_concurrent_generations = 0
        self.waiting = 0  # requests queued on the lock

    def prompt_tokens(self, messages: Sequence[dict], template: Template) -> int:
        return len(encode_prompt(self.tokenizer, template, messages))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _enter(self) -> None:
        with self._counter_lock:
            self.active_generations += 1
            self.most_concurrent_generations = max(self.most_concurrent_generations, self.active_generations)

    def _leave(self) -> None:
        with self._counter_lock:
            self.active_generations -= 1

    def _complete_blocking(self, messages, template, settings: GenerationConfig, seed: Optional[int]) -> Answer:
        import torch

        self._enter()
        try:
            if seed is not None:
                torch.manual_seed(seed)
            return generate_answers(self.model, self.tokenizer, template, [messages], settings, batch_size=1)[0]
        finally:
            self._leave()

    def _stream_blocking(self, messages, template, settings: GenerationConfig,
                         seed: Optional[int]) -> Iterator[Union[str, Answer]]:
        """The answer's pieces, then the whole Answer (its text empty) for the token count."""
        import torch

        self._enter()
        try:
            if seed is not None:
                torch.manual_seed(seed)
            answer = stream_answer(self.model, self.tokenizer, template, messages, settings)
            yield from answer
            yield Answer("", answer.tokens, answer.ended)
        finally:
            self._leave()

    async def _wait_turn(self) -> None:
        """Acquire the model lock, counted in `waiting` until then."""
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    async def complete(self, messages, template, settings: GenerationConfig, seed: Optional[int] = None) -> Answer:
        """The whole answer; waits its turn in the queue."""
        import anyio

        await self._wait_turn()
        try:
            # Shielded: a client that goes away must not release the lock while its generation still runs.
            with anyio.CancelScope(shield=True):
                return await anyio.to_thread.run_sync(self._complete_blocking, messages, template, settings, seed)
        finally:
            self.lock.release()

    async def stream(self, messages, template, settings: GenerationConfig,
                     seed: Optional[int] = None) -> AsyncIterator[Union[str, Answer]]:
        """The answer piece by piece, then its Answer (token count); the lock is held until generation ends,
        even if the client leaves."""
        await self._wait_turn()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed (server stopped); nobody is listening any more
                pass

        def produce() -> None:
            try:
                for piece in self._stream_blocking(messages, template, settings, seed):
                    put(("piece", piece))
                put(("done", None))
            except BaseException as exc:  # handed to the consumer below
                put(("error", exc))

        try:
            worker = loop.run_in_executor(None, produce)
        except BaseException:
            self.lock.release()
            raise
        worker.add_done_callback(lambda _: self.lock.release())
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                if value:
                    yield value
            elif kind == "done":
                return
            else:
                raise value


class StopScanner:
    """Cut a streamed answer at the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if hits:
            self.stopped = True
            text, self.buffer = self.buffer[: min(hits)], ""
            return text
        keep = min(self.hold, len(self.buffer))
        text, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return text

    def flush(self) -> str:
        text, self.buffer = ("" if self.stopped else self.buffer), ""
        return text


# --- request validation ------------------------------------------------------------------------------


async def read_json_body(request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is larger than the {limit} byte limit.", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise APIError(413, f"Request body is larger than the {limit} byte limit.", code="request_too_large")
    try:
        payload = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return payload


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model(payload: dict, engine: Engine) -> None:
    model = payload.get("model")
    if model is None:
        raise APIError(400, "You must provide a model parameter.", param="model")
    if not isinstance(model, str):
        raise APIError(400, "model must be a string.", param="model")
    if model != engine.model_id:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.model_id}'.",
                       param="model", code="model_not_found")


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{index}].content parts must be {{'type': 'text', 'text': str}}; "
                                    "only text is supported.", param=f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{index}].content must be a string.", param=f"messages[{index}].content")


def check_messages(payload: dict) -> list[dict]:
    """Plain {role, content} messages ending with a user turn."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array of {role, content} objects.", param="messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{index}] must be an object with role and content.", param=f"messages[{index}]")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise APIError(400, f"messages[{index}].role must be one of {', '.join(ROLES)} (got {role!r}).",
                           param=f"messages[{index}].role")
        checked.append({"role": role, "content": _message_text(message.get("content"), index)})
    if checked[-1]["role"] != "user":
        raise APIError(400, "The last message must have role 'user'.", param=f"messages[{len(checked) - 1}].role")
    return checked


def check_sampling(payload: dict, engine: Engine, cap: int) -> tuple[GenerationConfig, Optional[int]]:
    """Per-request sampling settings over the run's defaults, and the seed."""
    settings = engine.defaults.model_copy()
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    if max_tokens is None:
        max_tokens = min(settings.max_new_tokens, cap)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"{param} must be a positive integer.", param=param)
    elif max_tokens > cap:
        raise APIError(400, f"{param} is {max_tokens}, above this server's limit of {cap}.", param=param)
    update: dict[str, Any] = {"max_new_tokens": max_tokens}
    min_tokens = payload.get("min_tokens")  # vLLM's extension: no end token before this many
    if min_tokens is not None:
        if not _is_int(min_tokens) or not 0 <= min_tokens <= max_tokens:
            raise APIError(400, f"min_tokens must be an integer between 0 and {param} ({max_tokens}).",
                           param="min_tokens")
        update["min_new_tokens"] = min_tokens
    temperature = payload.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise APIError(400, "temperature must be a number between 0 and 2.", param="temperature")
        update["temperature"] = float(temperature)
    top_p = payload.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise APIError(400, "top_p must be a number in (0, 1].", param="top_p")
        update["top_p"] = float(top_p)
    n = payload.get("n")
    if n is not None and n != 1:
        raise APIError(400, "Only n=1 is supported.", param="n")
    for unsupported in ("logprobs", "top_logprobs", "best_of", "tools", "functions"):
        if payload.get(unsupported):
            raise APIError(400, f"{unsupported} is not supported by this server.", param=unsupported)
    seed = payload.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, "seed must be an integer.", param="seed")
    if not isinstance(payload.get("stream", False), bool):
        raise APIError(400, "stream must be a boolean.", param="stream")
    return settings.model_copy(update=update), seed


def check_stop(payload: dict) -> list[str]:
    stop = payload.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return stop
    raise APIError(400, "stop must be a string or an array of at most 4 strings.", param="stop")


def check_prompt(payload: dict) -> str:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request).", param="prompt")
    if not prompt:
        raise APIError(400, "prompt must not be empty.", param="prompt")
    return prompt


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _sse(payload: Any) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


# --- the app -----------------------------------------------------------------------------------------


def chat_page() -> str:
    """The chat page shipped in the package (inline CSS and JS, no external assets)."""
    return resources.files("loraft").joinpath("static/chat.html").read_text(encoding="utf-8")


def create_app(engine: Engine, settings: ServeSettings = ServeSettings()):
    """The FastAPI application serving `engine` under `settings`."""
    app = FastAPI(title="loraft", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), error_type=error_type).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return JSONResponse(APIError(400, "Invalid request.").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):  # our bug: keep the traceback in the log
        logger.exception("unexpected error while serving a request")
        body = APIError(500, "The server hit an internal error.", error_type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def model_card() -> dict:
        return {
            "id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "loraft",
            "loraft": {"template": engine.template.name, "base_model": engine.info.get("base_model"),
                       "max_tokens_cap": settings.max_tokens_cap},
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
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        if model_id != engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card()

    async def parse(request: Request) -> dict:
        authorize(request)
        payload = await read_json_body(request, settings.max_body_bytes)
        check_model(payload, engine)
        return payload

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        payload = await parse(request)
        messages = check_messages(payload)
        sampling, seed = check_sampling(payload, engine, settings.max_tokens_cap)
        stops = check_stop(payload)
        template = engine.template
        prompt_tokens = engine.prompt_tokens(messages, template)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if payload.get("stream"):
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))

            def chunk(delta: dict, finish_reason: Optional[str]) -> dict:
                return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": engine.model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

            return StreamingResponse(
                _chat_stream(engine, messages, template, sampling, seed, stops, chunk, prompt_tokens, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await engine.complete(messages, template, sampling, seed)
        answer, stopped = _cut_at_stop(result.text, stops)
        completion_tokens, finish = _usage(engine, result, answer, stopped)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        payload = await parse(request)
        prompt = check_prompt(payload)
        sampling, seed = check_sampling(payload, engine, settings.max_tokens_cap)
        stops = check_stop(payload)
        messages = [{"role": "user", "content": prompt}]
        prompt_tokens = engine.prompt_tokens(messages, RAW_TEXT)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if payload.get("stream"):
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))

            def chunk(delta: dict, finish_reason: Optional[str]) -> dict:
                return {"id": completion_id, "object": "text_completion", "created": created,
                        "model": engine.model_id,
                        "choices": [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                                     "finish_reason": finish_reason}]}

            return StreamingResponse(
                _chat_stream(engine, messages, RAW_TEXT, sampling, seed, stops, chunk, prompt_tokens, include_usage,
                             opening=False),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await engine.complete(messages, RAW_TEXT, sampling, seed)
        text, stopped = _cut_at_stop(result.text, stops)
        completion_tokens, finish = _usage(engine, result, text, stopped)
        return {
            "id": completion_id, "object": "text_completion", "created": created, "model": engine.model_id,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    return app


def _usage(engine: Engine, result: Answer, text: str, cut_at_stop: bool) -> tuple[int, str]:
    """(completion_tokens, finish_reason): the generated token count, or, when a stop string cut the text,
    the count of the text kept."""
    if cut_at_stop:
        return engine.count_tokens(text), "stop"
    return result.tokens, "stop" if result.ended else "length"


async def _chat_stream(engine: Engine, messages, template, sampling, seed, stops, chunk, prompt_tokens: int,
                       include_usage: bool, opening: bool = True) -> AsyncIterator[str]:
    """Server-sent events: an opening role chunk (chat), content chunks, a finish chunk, usage, [DONE]."""
    if opening:
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
    scanner = StopScanner(stops)
    pieces: list[str] = []
    result = Answer("", 0, False)
    try:
        async for piece in engine.stream(messages, template, sampling, seed):
            if isinstance(piece, Answer):
                result = piece
                continue
            text = scanner.feed(piece)
            if text:
                pieces.append(text)
                yield _sse(chunk({"content": text}, None))
            if scanner.stopped:
                break
        tail = scanner.flush()
        if tail:
            pieces.append(tail)
            yield _sse(chunk({"content": tail}, None))
    except Exception:  # the status line is sent already: report in-band, as OpenAI does
        logger.exception("generation failed while streaming")
        yield _sse(APIError(500, "The server hit an internal error while generating.", error_type="server_error").body())
        return
    completion_tokens, finish = _usage(engine, result, "".join(pieces), scanner.stopped)
    yield _sse(chunk({}, finish))
    if include_usage:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        final = chunk({}, None)
        final["choices"] = []
        final["usage"] = usage
        yield _sse(final)
    yield _sse("[DONE]")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_tokens_cap: int = 1024,
    max_body_bytes: int = 1 << 20,
    device: Optional[str] = None,
) -> None:
    """Load a finished run and serve it until Ctrl-C / SIGTERM (in-flight requests finish first)."""
    import uvicorn

    from loraft.generate import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    if max_tokens_cap < 1:
        raise RunError(f"--max-tokens-cap must be > 0 (got {max_tokens_cap})")
    if not 0 <= port <= 65535:
        raise RunError(f"--port must be between 0 and 65535 (got {port})")
    model, tokenizer, template, info = load_run(run_dir, device=device)
    config = info["config"]
    engine = Engine(model, tokenizer, template, run_dir.resolve().name, config.generation, info)
    app = create_app(engine, ServeSettings(api_key=api_key, max_tokens_cap=max_tokens_cap,
                                           max_body_bytes=max_body_bytes))
    if not _is_loopback(host) and api_key is None:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    logger.info("serving %s as model %r (%s template) at http://%s:%d/", run_dir, engine.model_id, template.name,
                host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=None))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        if exc.code not in (0, None):
            raise RunError(f"{host}:{port}: cannot start the server (is the address in use?)") from None
        raise
