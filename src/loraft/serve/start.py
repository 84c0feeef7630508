"""`loraft serve RUN [RUN ...]`: open the runs, load them on one base copy, and serve them under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

from loraft.errors import RunError
from loraft.serve.app import ServeSettings, create_app, run_uvicorn
from loraft.serve.engine import FALLBACK_CONTEXT_LENGTH, model_context_length
from loraft.serve.validation import is_loopback

logger = logging.getLogger("loraft")


def served_model_id(run_dir: Path, adapter_dir: Path, base_only: bool = False) -> str:
    """The model id a run is served under: the run's name; `RUN/checkpoint-N` for one of its checkpoints; `RUN/base`
    for its base model without the adapter."""
    name = run_dir.resolve().name
    if base_only:
        return f"{name}/base"
    return name if adapter_dir.resolve() == run_dir.resolve() else f"{name}/{adapter_dir.name}"


def serve(
    run_dir: Union[str, Path, Sequence[Union[str, Path]]],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_tokens_cap: int = 1024,
    max_body_bytes: int = 1 << 20,
    device: Optional[str] = None,
    max_queue: int = 16,
    allowed_hosts: Sequence[str] = (),
    shutdown_timeout: float = 30.0,
    context_length: Optional[int] = None,
    dtype: Optional[str] = None,
    access=None,
    base_only: bool = False,
    max_batch: int = 8,
    mix_adapters: bool = True,
    adapters_dir: Union[str, Path, None] = None,
    max_adapters: int = 64,
) -> None:
    """Load finished runs on one copy of their base and serve them until Ctrl-C / SIGTERM.

    Args:
        run_dir: one run directory or several; several must share a base (loraft.serve.adapters), and each is
            served under its directory's name, the base under its own.
        max_queue: requests that may wait for the model; more get 429 with Retry-After.
        allowed_hosts: Host names answered besides the bound address (`*`: any).
        shutdown_timeout: seconds that in-flight and queued requests get after SIGTERM; then they are cancelled.
        context_length: most prompt + answer tokens; None = the model's (max_position_embeddings, else the
            tokenizer's model_max_length, else 2048).
        dtype: weights dtype (auto, fp32, bf16, fp16); None = the first run's `generation.dtype`.
        access: a loraft.run_access.RunAccess (unfinished runs, a checkpoint, remote code); None = the finished adapter.
        base_only: serve one run's base model without the adapter, under the model id `RUN/base`.
        max_batch: most requests decoded together (1: one at a time).
        mix_adapters: whether one batch may hold several adapters (False: one adapter's requests at a time).
        adapters_dir: turns on /v1/load_lora_adapter and /v1/unload_lora_adapter for runs inside this directory.
        max_adapters: most adapters loaded at once through /v1/load_lora_adapter.
    """
    from loraft.generate import cli_flag, load_run, resolve_generation
    from loraft.run_access import RunAccess, open_run
    from loraft.serve.adapters import LiveAdapters, load_runs, mix_problem

    run_dirs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(p) for p in run_dir]
    for flag, value, least in (("--max-tokens-cap", max_tokens_cap, 1), ("--max-queue", max_queue, 1),
                               ("--max-body-bytes", max_body_bytes, 1), ("--max-batch", max_batch, 1),
                               ("--max-adapters", max_adapters, 1)):
        if value < least:
            raise RunError(f"{flag} must be > 0 (got {value})")
    if not 0 <= port <= 65535:
        raise RunError(f"--port must be between 0 and 65535 (got {port})")
    if shutdown_timeout < 0:
        raise RunError(f"--shutdown-timeout must be >= 0 (got {shutdown_timeout})")
    if context_length is not None and context_length < 2:
        raise RunError(f"--context-length must be > 1 (got {context_length})")
    if not run_dirs:
        raise RunError("name at least one run directory to serve")
    if base_only and (len(run_dirs) > 1 or adapters_dir is not None):
        raise RunError("--base serves one run's base model alone: give one run and no --adapters-dir")
    if adapters_dir is not None:
        if not Path(adapters_dir).is_dir():
            raise RunError(f"{adapters_dir}: --adapters-dir is not a directory")
        if not is_loopback(host) and api_key is None:
            raise RunError(f"--adapters-dir on {host} needs --api-key: off loopback, loading adapters takes a key, "
                           "as `loraft ui` does")
    # each run's own check before any model is loaded; the first run's generation.dtype unless --dtype says otherwise
    runs = [open_run(run_dir, access or RunAccess()) for run_dir in run_dirs]
    dtype = resolve_generation(runs[0].config.generation, {"dtype": dtype}, label=cli_flag).dtype
    names = [served_model_id(run.run_dir, run.adapter_dir, base_only) for run in runs]
    options = {"max_queue": max_queue, "context_length": context_length, "max_batch": max_batch,
               "mix_adapters": mix_adapters}
    live = None
    if base_only:
        from loraft.serve.engine import Engine

        model, tokenizer, template, info = load_run(runs[0], device=device, dtype=dtype, base_only=True)
        engine = Engine(model, tokenizer, template, names[0], info["config"].generation, info, **options)
    else:
        # an adapter that cannot mix serves alone, without the base beside it
        problem = mix_problem(runs[0].adapter_dir)
        if adapters_dir is not None and problem is not None:
            raise RunError(f"{runs[0].run_dir}: {problem}, so no other adapter can be loaded beside it: serve it "
                           "without --adapters-dir")
        engine, shared = load_runs(runs, names, device=device, dtype=dtype, serve_base=problem is None, **options)
        if adapters_dir is not None:
            live = LiveAdapters(engine, shared, Path(adapters_dir), max_adapters=max_adapters)
    model = engine.model
    if context_length is None and model_context_length(model, engine.tokenizer) is None:
        logger.warning("neither the model's config nor its tokenizer states a context length: prompts are limited "
                       "to %d tokens with the answer (set --context-length to change it)", FALLBACK_CONTEXT_LENGTH)
    app = create_app(engine, ServeSettings(api_key=api_key, max_tokens_cap=max_tokens_cap,
                                           max_body_bytes=max_body_bytes, host=host, port=port,
                                           allowed_hosts=tuple(allowed_hosts)), live=live)
    if not is_loopback(host) and api_key is None:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    for name in engine.names:
        served = engine.models[name]
        logger.info("serving model %r (%s, %s template)", name,
                    served.info.get("adapter_dir") or "the base without an adapter", served.template.name)
    logger.info("%s weights, context %d tokens, batches of up to %d, at http://%s:%d/%s",
                str(next(model.parameters()).dtype).replace("torch.", ""), engine.context_length, max_batch, host,
                port, f" (adapters load from {Path(adapters_dir).resolve()})" if live else "")
    run_uvicorn(app, host, port, shutdown_timeout, "info", "the server")
