"""OpenAI's wire format: the response objects (chat.completion(.chunk), text_completion), their usage counts,
and the server-sent event stream of a streamed answer (role chunk, content chunks, finish, usage, [DONE])."""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional, Sequence

from loraft.generate import Answer
from loraft.serve.engine import Served, StopScanner
from loraft.serve.validation import APIError

logger = logging.getLogger("loraft")


class ResponseShape:
    """OpenAI's response objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, model_id: str, chat: bool):
        self.model_id, self.chat = model_id, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, "choices": choices,
                **extra}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return self._object("chat.completion", [choice], usage=usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._object("text_completion", [choice], usage=usage)

    def chunk(self, delta: dict, finish: Optional[str], usage: Optional[dict] = None) -> dict:
        if usage is not None:
            choices = []
        elif self.chat:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}]
        extra = {"usage": usage} if usage is not None else {}
        return self._object("chat.completion.chunk" if self.chat else "text_completion", choices, **extra)


def completion_usage(served: Served, result: Answer, text: str, cut_at_stop: bool) -> tuple[int, str]:
    """(completion_tokens, finish_reason): the generated token count, or, when a stop string cut the text,
    the count of the text kept (in the served model's tokens)."""
    if cut_at_stop:
        return (len(served.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0), "stop"
    return result.tokens, "stop" if result.ended else "length"


def sse(payload: Any) -> str:
    """One server-sent event carrying `payload` (a JSON object, or a bare string such as [DONE])."""
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


async def event_stream(served: Served, pieces: AsyncIterator, stops: Sequence[str], shape: ResponseShape,
                        prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: an opening role chunk (chat), content chunks, a finish chunk, usage, [DONE]."""
    if shape.chat:
        yield sse(shape.chunk({"role": "assistant", "content": ""}, None))
    scanner = StopScanner(stops)
    kept: list[str] = []
    result = Answer("", 0, False)
    try:
        async with aclosing(pieces):
            async for piece in pieces:
                if isinstance(piece, Answer):
                    result = piece
                    continue
                text = scanner.feed(piece)
                if text:
                    kept.append(text)
                    yield sse(shape.chunk({"content": text}, None))
                if scanner.stopped:
                    break
        tail = scanner.flush()
        if tail:
            kept.append(tail)
            yield sse(shape.chunk({"content": tail}, None))
    except Exception:  # the status line is sent already: report in-band, as OpenAI does
        logger.exception("generation failed while streaming")
        yield sse(APIError(500, "The server hit an internal error while generating.", error_type="server_error").body())
        return
    completion_tokens, finish = completion_usage(served, result, "".join(kept), scanner.stopped)
    yield sse(shape.chunk({}, finish))
    if include_usage:
        yield sse(shape.chunk({}, None, usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                "total_tokens": prompt_tokens + completion_tokens}))
    yield sse("[DONE]")
