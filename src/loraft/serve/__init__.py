"""OpenAI-compatible HTTP server for one run or several runs of one base (FastAPI + uvicorn), with a small chat
page at `/`.

Endpoints: POST /v1/chat/completions (applies the chosen run's template; `stream: true` answers as server-sent
events), POST /v1/completions (raw text continuation), GET /v1/models (every run and the base), GET /health (with
how many requests are generating and waiting), GET / (the page), and with --adapters-dir vLLM's
POST /v1/load_lora_adapter and /v1/unload_lora_adapter. Besides OpenAI's sampling fields, requests accept vLLM's
`min_tokens`.

One model serves every request: a worker thread decodes them together in a batch whose rows join and leave at
any step, each through its own adapter, behind a bounded queue (429 with Retry-After when it is full), so the
event loop keeps answering meanwhile. A generation stops at its stop string, or when its client disconnects.
Bad requests get a 4xx in OpenAI's error shape, never a 500. On Ctrl-C / SIGTERM, in-flight and queued
requests get `shutdown_timeout` seconds to finish; then they are cancelled.

    engine.py      the names served (Served), the queue (QueueFull when it is full), tokenizing off the event loop
    batcher.py     the thread that owns the model: the running batch, its cache spliced as rows join and leave
    job.py         one request's row: adapter, sampling, generator, text, stop
    lora_rows.py   each row through its own adapter (stacked LoRA matmuls; peft's adapter_names elsewhere)
    adapters.py    which runs share a base and a batch; loading runs; live load/unload confined to --adapters-dir
    validation.py  Host, API key, Content-Type, body and field checks -> APIError (a 4xx)
    wire.py        OpenAI's wire format: response objects, usage, the server-sent event stream
    app.py         the FastAPI routes and errors (QueueFull -> 429)
    start.py       `serve`: opens the runs, loads them on one base, runs uvicorn
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
