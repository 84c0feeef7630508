"""OpenAI-compatible HTTP server for a run directory (FastAPI + uvicorn), with a small chat page at `/`.

Endpoints: POST /v1/chat/completions (applies the run's template; `stream: true` answers as server-sent
events), POST /v1/completions (raw text continuation), GET /v1/models, GET /health (with how many
requests are generating and waiting), GET / (the page). Besides OpenAI's sampling fields, requests accept
vLLM's `min_tokens`.

One model serves every request: generations run one at a time in a worker thread, queued first come
first served on an asyncio lock behind a bounded queue (429 with Retry-After when it is full), so the event
loop keeps answering meanwhile. A generation stops at its stop string, or when its client disconnects.
Bad requests get a 4xx in OpenAI's error shape, never a 500. On Ctrl-C / SIGTERM, in-flight and queued
requests get `shutdown_timeout` seconds to finish; then they are cancelled.

    engine.py      the model, its queue (QueueFull when it is full), tokenizing off the event loop, stopping criteria
    validation.py  Host, API key, Content-Type, body and field checks -> APIError (a 4xx)
    wire.py        OpenAI's wire format: response objects, usage, the server-sent event stream
    app.py         the FastAPI routes and errors (QueueFull -> 429); `serve` loads a run and runs uvicorn
"""

__all__ = ["APIError", "Engine", "RAW_TEXT", "ServeSettings", "StopScanner", "chat_page", "create_app",
           "model_context_length", "serve"]


def __getattr__(name: str):
    # loaded on first use, as loraft.export's names: `loraft.serve.validation` (the Host rule `loraft ui` checks
    # before it confines itself) comes without torch, which starts a thread at import
    if name in ("ServeSettings", "chat_page", "create_app"):
        from loraft.serve import app

        return getattr(app, name)
    if name == "serve":
        from loraft.serve.start import serve

        return serve
    if name in ("Engine", "StopScanner", "model_context_length"):
        from loraft.serve import engine

        return getattr(engine, name)
    if name == "APIError":
        from loraft.serve.validation import APIError

        return APIError
    if name == "RAW_TEXT":
        from loraft.templates import RAW_TEXT

        return RAW_TEXT
    raise AttributeError(f"module 'loraft.serve' has no attribute {name!r}")
