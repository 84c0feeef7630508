"""What a UI request may carry: the token (checked before any route runs), a JSON body's fields, a query's
numbers; and the UI's settings of who may ask and how much at once. Every refusal is a RequestError: a 4xx and one
sentence naming the field."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from loraft.serve.validation import APIError, check_content_type, read_json_body
from loraft.ui.workspace import RequestError




@dataclass(frozen=True)
class UISettings:
    """Who the UI answers (the token, None: none needed; the bound address for the Host check, port None checks no
    port: an in-process client), whether names may be hub ids, and how much one client can make it do at once."""

    token: Optional[str] = None
    host: str = "127.0.0.1"
    port: Optional[int] = None
    allowed_hosts: tuple[str, ...] = ()
    allow_hub: bool = False  # a name that is no file in the workspace may be a hub id (downloads)
    time_limit: float = 120.0  # seconds for one plan, data check, preview or config check (loraft.ui.work)
    max_runs: Optional[int] = 4  # runs starting or running at once (None: no limit)
    max_jobs: Optional[int] = 4  # eval, merge and export jobs running at once
    max_streams: int = 64  # event streams open at once
    max_chat_loads: int = 2  # chat models loading at once
    warm_worker: bool = False  # start a worker process at once (loraft ui does), not on the first plan


MAX_BODY_BYTES = 1 << 20
# the chat page (/chat/NAME/) is public like /static: a browser cannot send a header when it opens a page
CHAT_API = re.compile(r"^/chat/.+/v1(/|$)")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"SAMEORIGIN"),
                    (b"referrer-policy", b"no-referrer")]


def error(status: int, message: str) -> JSONResponse:
    """The UI's answer to a refused request: {"error": one sentence}."""
    return JSONResponse({"error": message}, status_code=status)


class RequestGate:
    """ASGI middleware, before any route: a request that changes something (not GET/HEAD) must come from the UI's
    own pages (its Origin, when a browser sends one, is the Host it asked: no other site can stop or start runs
    through a visitor's browser, even a page-less POST that needs no CORS preflight); /api/ and the chat API need
    the token (X-Loraft-Token; the chat page's own key box sends it as `Authorization: Bearer`). Every answer
    carries headers that keep other sites from framing or re-typing it."""

    def __init__(self, app, token: Optional[str]):
        self.app = app
        # bytes: headers arrive as latin-1 bytes, a token may be any UTF-8 text
        self.token = token.encode("utf-8", "surrogateescape") if token is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        path, headers = scope["path"], dict(scope["headers"])
        problem = None
        guarded = path.startswith("/api/") or CHAT_API.match(path)
        if scope["method"] not in ("GET", "HEAD"):
            problem = self.cross_site(headers)
        # a GET from another site's page (an <img> or <script> pointing here) could still load models or read
        # nothing but cost memory: browsers name where a request comes from, and only the UI's own pages may ask
        if problem is None and guarded and headers.get(b"sec-fetch-site", b"none") not in (b"same-origin", b"none"):
            problem = 403, "a request from another site is refused: use the UI's own page"
        if problem is None and self.token is not None and guarded:
            problem = self.refusal(headers, chat=path.startswith("/chat/"))
        if problem is not None:
            await error(problem[0], problem[1])(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def cross_site(headers: dict) -> Optional[tuple[int, str]]:
        origin = headers.get(b"origin")
        if origin is None:  # not a browser's cross-site request (curl, scripts, same-origin GET-like fetches)
            return None
        host = headers.get(b"host", b"").lower()
        if origin.lower().partition(b"://")[2] != host or not host:
            shown = origin.decode("latin-1")
            return 403, f"a request from another site ({shown}) is refused: use the UI's own page"
        return None

    def refusal(self, headers: dict, chat: bool) -> Optional[tuple[int, str]]:
        sent = headers.get(b"x-loraft-token")
        if sent is None and chat:
            scheme, _, bearer = headers.get(b"authorization", b"").partition(b" ")
            sent = bearer.strip() if scheme.lower() == b"bearer" and bearer.strip() else None
        if sent is None:
            return 401, "this UI needs its token: send it in the X-Loraft-Token header"
        if not hmac.compare_digest(sent, self.token):
            return 401, "the X-Loraft-Token header does not match this UI's token"
        return None


TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", list: "a list of strings"}


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


async def read_payload(request: Request, allow_empty: bool = False) -> dict:
    """The JSON object a POST carries, declared application/json (a page on another site can post a form or
    text/plain without asking, not JSON); where `allow_empty`, an action without fields (stop, resume) may
    also come without a body at all: {}."""
    try:
        if allow_empty and request.headers.get("content-length") in (None, "0"):
            if not (await request.body()).strip():
                return {}
        check_content_type(request.headers.get("content-type"))
        return await read_json_body(request, MAX_BODY_BYTES)
    except APIError as exc:
        raise RequestError(exc.status, exc.message) from None


def check_fields(payload: dict, spec: dict[str, tuple[type, bool]]) -> dict:
    """The body's fields by `spec` ({key: (type, required)}): unknown keys, wrong types and missing required
    fields are 400s naming the key; an absent or null optional field is None."""
    for key in payload:
        if key not in spec:
            known = ", ".join(spec) or "none"
            raise RequestError(400, f"unknown key {key!r} in the request body (known keys: {known})")
    values = {}
    for key, (kind, required) in spec.items():
        value = payload.get(key)
        if value is None:
            if required:
                raise RequestError(400, f"{key} is required")
        elif (kind is int and (not isinstance(value, int) or isinstance(value, bool))) or (
                kind is list and not (isinstance(value, list) and all(isinstance(item, str) for item in value))) or (
                kind in (str, bool) and not isinstance(value, kind)):
            raise RequestError(400, f"{key} must be {TYPE_NAMES[kind]} (got {_json_type(value)})")
        texts = value if isinstance(value, list) else [value] if isinstance(value, str) else []
        if not all(_is_unicode(text) for text in texts):  # JSON's "\ud800" decodes to a lone surrogate
            raise RequestError(400, f"{key} is not valid Unicode text (it holds a lone surrogate)")
        values[key] = value
    return values


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def read_body(request: Request, spec: dict[str, tuple[type, bool]]) -> dict:
    """read_payload, then check_fields."""
    return check_fields(await read_payload(request, allow_empty=not spec), spec)


def at_least(values: dict, key: str, minimum: int) -> None:
    if values.get(key) is not None and values[key] < minimum:
        raise RequestError(400, f"{key} must be >= {minimum} (got {values[key]})")


def lines_query(request: Request, default: int) -> int:
    text = request.query_params.get("lines")
    if text is None:
        return default
    # the length first: int() of a 5,000-digit string raises (Python's conversion limit), a 6-digit one cannot
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not 0 < int(text) <= 100_000:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise RequestError(400, f"lines must be a whole number from 1 to 100000 (got {shown!r})")
    return int(text)
