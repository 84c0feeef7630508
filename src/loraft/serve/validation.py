"""Request validation: every client mistake becomes an APIError, a 4xx in OpenAI's error shape.

The checks run in the order a request is handled: Host (DNS rebinding), API key, Content-Type (cross-site
posts), body size and JSON, then the fields. Only cheap checks live here; the prompt's token count is
checked against the context in `fit_context` once the engine has tokenized it off the event loop.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence, Union

from starlette.responses import Response

from loraft.config import GenerationConfig
from loraft.templates import ROLES

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
# torch.manual_seed takes 64 bits; OpenAI's and vLLM's seed is a signed 64-bit integer
SEED_RANGE = (-(2**63), 2**63 - 1)
# logits / 1e-300 overflow to inf and sampling fails on NaN probabilities; a temperature this small is greedy
GREEDY_BELOW = 1e-5


class APIError(Exception):
    """A request error reported in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 error_type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message may quote client text that is not valid UTF-8 (a lone surrogate from "\ud800")
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=self.headers)


# --- who may ask: Host, API key, Content-Type ------------------------------------------------------------


def split_host(value: str) -> Optional[tuple[str, Optional[int]]]:
    """(name, port) of a Host header, the name lowercased and an IPv6 address in brackets; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
    elif value.count(":") > 1:  # an IPv6 address must be bracketed
        return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not name:
        return None
    if not rest:
        return name, None
    digits = rest[1:]
    if not (rest[0] == ":" and digits.isascii() and digits.isdigit()):
        return None
    return name, int(digits)


def _host_name(address: str) -> str:
    """An address as it appears in a Host header (IPv6 in brackets)."""
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address.lower()
    except ValueError:
        return address.lower()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HostRule:
    """The Host headers the server answers. A DNS-rebinding page reaches a loopback server under its own
    host name (evil.example:8000); refusing names other than the bound address keeps it from reading replies.

    `bound` names must carry the server's port (when known); `extra` names (allowed_hosts) may carry any.
    """

    bound: frozenset[str]
    port: Optional[int]
    extra: frozenset[str] = frozenset()

    def check(self, header: Optional[str]) -> None:
        parsed = split_host(header) if header else None
        if parsed is not None:
            name, port = parsed
            if name in self.extra:
                return
            if name in self.bound and (self.port is None or port == self.port):
                return
        shown = repr(header) if header else "missing"
        names = ", ".join(sorted(self.bound | self.extra))
        raise APIError(400, f"Host header {shown} is not allowed: this server answers to {names}"
                            f"{f' on port {self.port}' if self.port else ''}; add names with --allowed-hosts.",
                       code="invalid_host")


def host_rule(bind_host: str, port: Optional[int], allowed_hosts: Sequence[str] = ()) -> Optional[HostRule]:
    """The Host rule for a server bound to `bind_host:port`; None when any Host is accepted (an `*` in
    allowed_hosts, or a wildcard bind such as 0.0.0.0 without allowed_hosts: its names are not known)."""
    extra = frozenset(name.strip().lower() for name in allowed_hosts if name.strip())
    if "*" in extra:
        return None
    if is_loopback(bind_host):
        bound = LOOPBACK_NAMES | {_host_name(bind_host)}
    elif bind_host in ("", "0.0.0.0", "::"):
        if not extra:
            return None
        bound = LOOPBACK_NAMES
    else:
        bound = frozenset({_host_name(bind_host)})
    return HostRule(bound, port or None, extra)  # port 0: picked by the OS, not known here


def check_api_key(raw_headers: Sequence[tuple[bytes, bytes]], key: bytes) -> None:
    """401 unless the Authorization header is `Bearer <key>`; compared as bytes, in constant time.

    Bytes, not str: HTTP headers decode as latin-1, so a UTF-8 key compared as text never matches.
    """
    header = next((value for name, value in raw_headers if name.lower() == b"authorization"), b"")
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip(), key):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_content_type(content_type: Optional[str]) -> None:
    """415 unless the body is declared JSON: a web page can post text/plain or a form to a loopback server
    without asking (no CORS preflight), but not application/json."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        got = f"got {content_type!r}" if content_type else "none was sent"
        raise APIError(415, f"Content-Type must be application/json ({got}).", code="unsupported_media_type")


async def read_json_body(request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes (declared or read), 400 when it is not one."""
    too_large = APIError(413, f"Request body is larger than the {limit} byte limit.", code="request_too_large")
    declared = request.headers.get("content-length")
    # a 5,000-digit length is past any limit, and int() of it raises (Python's conversion limit)
    if declared and declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large  # refused before reading a byte of it
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
    try:
        payload = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.") from None
    except RecursionError:  # e.g. 100,000 "["
        raise APIError(400, "We could not parse the JSON body of your request: it nests too deeply.") from None
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return payload


# --- the fields ------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: str, param: str) -> str:
    """`value` if it can be encoded as UTF-8 (JSON's "\\ud800" decodes to a lone surrogate, which cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} is not valid Unicode text (it holds a lone surrogate).", param=param) from None
    return value


def check_model(payload: dict, served: Union[str, Sequence[str]]) -> str:
    """The requested model's name, which must be one of `served`."""
    served = [served] if isinstance(served, str) else list(served)
    model = payload.get("model")
    if model is None:
        raise APIError(400, "You must provide a model parameter.", param="model")
    if not isinstance(model, str):
        raise APIError(400, "model must be a string.", param="model")
    if model not in served:
        listed = ", ".join(f"'{name}'" for name in served[:8]) + (f" and {len(served) - 8} more" if len(served) > 8
                                                                  else "")
        raise APIError(404, f"The model '{model}' does not exist; this server serves {listed}.",
                       param="model", code="model_not_found")
    return model


def _message_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"{param} parts must be {{'type': 'text', 'text': str}}; only text is supported.",
                               param=param)
            texts.append(_text(part["text"], param))
        return "".join(texts)
    raise APIError(400, f"{param} must be a string.", param=param)


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


def check_prompt(payload: dict) -> str:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request).", param="prompt")
    if not prompt:
        raise APIError(400, "prompt must not be empty.", param="prompt")
    return _text(prompt, "prompt")


class Sampling(NamedTuple):
    """A request's generation settings, its seed, and the field that set max_tokens (None: the run's default,
    which the context may shorten)."""

    settings: GenerationConfig
    seed: Optional[int]
    max_tokens_param: Optional[str]


def check_sampling(payload: dict, defaults: GenerationConfig, cap: int) -> Sampling:
    """Per-request sampling settings over the run's defaults."""
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    if max_tokens is None:
        max_tokens, explicit = min(defaults.max_new_tokens, cap), None
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"{param} must be a positive integer.", param=param)
    elif max_tokens > cap:
        raise APIError(400, f"{param} is {max_tokens}, above this server's limit of {cap}.", param=param)
    else:
        explicit = param
    update: dict[str, Any] = {"max_new_tokens": max_tokens}
    min_tokens = payload.get("min_tokens")  # vLLM's extension: no end token before this many
    if min_tokens is not None:
        if not _is_int(min_tokens) or not 0 <= min_tokens <= max_tokens:
            raise APIError(400, f"min_tokens must be an integer between 0 and {param} ({max_tokens}).",
                           param="min_tokens")
        update["min_new_tokens"] = min_tokens
    for name in ("temperature", "top_p"):  # their ranges are GenerationConfig's (resolve_generation, below)
        value = payload.get(name)
        if value is not None:
            if not _is_number(value):
                raise APIError(400, f"{name} must be a number.", param=name)
            update[name] = float(value)
    if update.get("temperature") is not None and 0 <= update["temperature"] < GREEDY_BELOW:
        update["temperature"] = 0.0
    n = payload.get("n")
    if n is not None and n != 1:
        raise APIError(400, "Only n=1 is supported.", param="n")
    for unsupported in ("logprobs", "top_logprobs", "best_of", "tools", "functions"):
        if payload.get(unsupported):
            raise APIError(400, f"{unsupported} is not supported by this server.", param=unsupported)
    seed = payload.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise APIError(400, f"seed must be an integer between {SEED_RANGE[0]} and {SEED_RANGE[1]}.", param="seed")
    from loraft.generate import GenerationSettingError, resolve_generation

    try:
        settings = resolve_generation(defaults, update)
    except GenerationSettingError as exc:
        param = {"max_new_tokens": param, "min_new_tokens": "min_tokens"}.get(exc.field, exc.field)
        raise APIError(400, f"{param} {exc.reason} (got {exc.value!r}).", param=param) from None
    return Sampling(settings, seed, explicit)


def check_stop(payload: dict) -> list[str]:
    stop = payload.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return [_text(s, "stop") for s in stop]
    raise APIError(400, "stop must be a string or an array of at most 4 strings.", param="stop")


def check_stream(payload: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean.", param="stream")
    options = payload.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object such as {\"include_usage\": true}.",
                       param="stream_options")
    include_usage = options.get("include_usage", False)
    if include_usage is None:
        include_usage = False
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be a boolean.", param="stream_options.include_usage")
    return stream, include_usage


def fit_context(sampling: Sampling, prompt_tokens: int, context_length: int, prompt_param: str) -> GenerationConfig:
    """The settings with max_new_tokens fitted to the context: a default shrinks to the room left; an explicit
    max_tokens that does not fit, or a prompt that leaves no room, is a 400 giving the numbers."""
    settings = sampling.settings
    room = context_length - prompt_tokens
    where = "messages" if prompt_param == "messages" else "prompt"
    if sampling.max_tokens_param is None and room < 1:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, your "
                            f"{where} resulted in {prompt_tokens} tokens. Please reduce the length of the {where}.",
                       param=prompt_param, code="context_length_exceeded")
    if sampling.max_tokens_param is not None and settings.max_new_tokens > room:
        requested = prompt_tokens + settings.max_new_tokens
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, you "
                            f"requested {requested} tokens ({prompt_tokens} in the {where}, "
                            f"{settings.max_new_tokens} in the completion). Please reduce the length of the "
                            f"{where} or completion.", param=prompt_param, code="context_length_exceeded")
    if settings.max_new_tokens <= room:
        return settings
    return settings.model_copy(update={"max_new_tokens": room,
                                       "min_new_tokens": min(settings.min_new_tokens, room)})
