"""Many runs on one base: which runs can share a base copy and a mixed batch, loading them at start, and loading
and unloading them while the server runs (vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`).

Runs share the base when their `model` settings name the same weights (path, revision, quantization) and their
tokenizers have the same vocabulary. A batch may mix LoRA adapters, with or without `modules_to_save` (peft's
`adapter_names` covers Linear and Embedding layers and the saved modules' copies); DoRA, IA3, prompt tuning and
prefix tuning cannot join one (peft refuses DoRA in a mixed batch; the others have no per-row path), so a server of
several runs refuses them, and serves them alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from loraft.errors import LoraftError, RunError
from loraft.serve.engine import Engine, Served
from loraft.serve.validation import APIError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class BaseKey:
    """What makes two runs' bases one: the weights they load, their revision and quantization."""

    weights: str
    revision: Optional[str]
    quantization: str

    def __str__(self) -> str:
        extra = [f"revision {self.revision}"] if self.revision else []
        extra += [f"{self.quantization} quantization"] if self.quantization != "none" else []
        return self.weights + (f" ({', '.join(extra)})" if extra else "")

    @property
    def name(self) -> str:
        """The name the base is served under: a hub id as it is, a local path's last part (a GGUF file's stem)."""
        path = Path(self.weights)
        if path.exists():
            return path.stem if path.is_file() else path.name
        return self.weights


def base_key(run) -> BaseKey:
    """The base of an opened run (loraft.rundir.UsableRun): a local path resolved, so two spellings of it agree."""
    model = run.config.model
    weights = model.name_or_path
    if Path(weights).exists():
        weights = str(Path(weights).resolve())
    return BaseKey(weights, model.revision, model.quantization)


def mix_problem(adapter_dir: Path) -> Optional[str]:
    """Why this adapter cannot join a batch that mixes adapters (None when it can), from its adapter_config.json."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its {ADAPTER_CONFIG} cannot be read"
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        return f"it is a {kind.lower().replace('_', ' ') or 'non-LoRA'} adapter, which peft cannot mix in one batch"
    if config.get("use_dora"):
        return "it is a DoRA adapter, which peft cannot mix in one batch"
    return None


def same_vocabulary(first, second) -> bool:
    return first is second or (len(first) == len(second) and first.get_vocab() == second.get_vocab())


class RunsOnOneBase:
    """Opens runs for one shared base and turns them into Served models: checks (same base, mixable kind, same
    vocabulary, a name not taken) happen before anything is loaded, each as one sentence (RunError)."""

    def __init__(self, key: BaseKey, vocabulary_tokenizer, dtype: str):
        self.key, self.tokenizer, self.dtype = key, vocabulary_tokenizer, dtype
        self._names = itertools.count(1)
        self._lock = threading.Lock()

    def check(self, run, name: str, taken: Sequence[str], show=str) -> None:
        """Raises RunError when the run cannot join; `show` writes a base (a client is shown its name only)."""
        where = run.run_dir
        if name in taken:
            raise RunError(f"{where}: the name {name!r} is served already (runs are served under their directory's "
                           "name: copy or rename one of them)")
        key = base_key(run)
        if key != self.key:
            raise RunError(f"{where}: its base is {show(key)}, not the {show(self.key)} this server shares: serve it "
                           "from a server of its own")
        problem = mix_problem(run.adapter_dir)
        if problem is not None:
            raise RunError(f"{where}: cannot share a base with other adapters: {problem}; serve it alone")

    def adapter_name(self) -> str:
        """A fresh peft adapter name (a name unloaded and loaded again gets a new one: no clash while draining)."""
        with self._lock:
            return f"served-{next(self._names)}"

    def served(self, run, name: str, adapter: str) -> Served:
        """The Served model of a run whose adapter is (or is about to be) in the model as `adapter`."""
        from loraft.model import load_tokenizer
        from loraft.templates import get_template

        tokenizer = load_tokenizer(str(run.adapter_dir))
        if not same_vocabulary(tokenizer, self.tokenizer):
            raise RunError(f"{run.run_dir}: its tokenizer's vocabulary differs from the base's ({len(tokenizer)} "
                           f"tokens, not {len(self.tokenizer)}): serve it from a server of its own")
        template = get_template(run.record.get("template") or run.config.data.template, tokenizer)
        info = {"config": run.config, **run.record, "adapter_dir": str(run.adapter_dir), "dtype": self.dtype}
        return Served(name, adapter, tokenizer, template, run.config.generation, info)


def load_runs(runs: Sequence, names: Sequence[str], device: Optional[str], dtype: Optional[str],
              serve_base: bool = True, **engine_options) -> tuple[Engine, RunsOnOneBase]:
    """One Engine serving every run (opened, loraft.rundir.UsableRun) on one copy of their shared base, each
    under its name, and the base itself (without adapters) under its own name when `serve_base`.

    Raises:
        RunError: runs on different bases, an adapter that cannot be mixed, a name served twice.
    """
    from loraft.generate import load_run

    first = runs[0]
    if len(runs) > 1:  # every run checked before any weight loads (the vocabularies, once the tokenizers load)
        before_loading = RunsOnOneBase(base_key(first), None, None)
        for index, (run, name) in enumerate(zip(runs, names)):
            before_loading.check(run, name, names[:index])
    model, tokenizer, template, info = load_run(first, device=device, dtype=dtype)
    shared = RunsOnOneBase(base_key(first), tokenizer, info["dtype"])
    engine = Engine(model, tokenizer, template, names[0], first.config.generation, info, **engine_options)
    for run, name in zip(runs[1:], names[1:]):
        adapter = shared.adapter_name()
        served = shared.served(run, name, adapter)
        model.load_adapter(str(run.adapter_dir), adapter_name=adapter, is_trainable=False)
        engine.add(served)
    if serve_base:
        base_name = shared.key.name
        if base_name not in engine.models:
            engine.add(Served(base_name, None, tokenizer, template, first.config.generation,
                              {**info, "adapter_dir": None}))
    model.eval()
    return engine, shared


class LiveAdapters:
    """Loading and unloading runs while the server runs, confined to `adapters_dir`.

    A load is checked (the path inside `adapters_dir`, a finished run, the shared base, a mixable kind, a free name)
    before its weights are read; the weights go into the model on the batcher's thread, between two decode steps.
    An unload stops new requests for the name at once, waits until the requests already on it have ended, then
    deletes the adapter's weights. Loads run one at a time; at most `max_pending` wait (429 past that).
    """

    NAME_LIMIT = 128

    def __init__(self, engine: Engine, shared: RunsOnOneBase, adapters_dir: Path, max_adapters: int = 64,
                 max_pending: int = 4):
        self.engine, self.shared = engine, shared
        self.adapters_dir = Path(adapters_dir).resolve()
        self.max_adapters, self.max_pending = max_adapters, max_pending
        self._load_lock = asyncio.Lock()
        self.pending = 0
        self._claimed: set[str] = set()  # names being loaded now

    # --- checks ---------------------------------------------------------------------------------------------

    def check_name(self, name, taken: bool) -> str:
        """`lora_name` checked: a string of 1 to 128 printable characters; `taken` says it must be served now."""
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name must be a non-empty string.", param="lora_name")
        if len(name) > self.NAME_LIMIT or not name.isprintable():
            raise APIError(400, f"lora_name must be at most {self.NAME_LIMIT} printable characters.",
                           param="lora_name")
        served = self.engine.lookup(name)
        if taken and served is None:
            raise APIError(404, f"The adapter '{name}' is not loaded.", param="lora_name", code="model_not_found")
        if not taken and (served is not None or name in self._claimed):
            raise APIError(400, f"The adapter '{name}' is loaded already; unload it first.", param="lora_name")
        return name

    def confine(self, path) -> Path:
        """`lora_path` as a directory inside `adapters_dir` (relative paths are relative to it; links resolved)."""
        if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
            raise APIError(400, "lora_path must be a non-empty path string.", param="lora_path")
        try:
            resolved = (self.adapters_dir / path).resolve()
        except (OSError, RuntimeError, ValueError):
            raise APIError(400, "lora_path cannot be resolved.", param="lora_path") from None
        if not resolved.is_relative_to(self.adapters_dir):
            raise APIError(400, "lora_path must be inside the server's --adapters-dir.", param="lora_path")
        if not resolved.is_dir():
            raise APIError(400, f"lora_path {path!r} is not a run directory inside --adapters-dir.", param="lora_path")
        return resolved

    # --- load and unload ------------------------------------------------------------------------------------

    async def load(self, name, path) -> Served:
        from loraft.run_access import RunAccess, open_run

        name = self.check_name(name, taken=False)
        run_dir = self.confine(path)
        loaded = sum(1 for served in self.engine.models.values() if served.adapter is not None)
        if loaded + len(self._claimed) >= self.max_adapters:
            raise APIError(400, f"{self.max_adapters} adapters are loaded (the server's --max-adapters); unload one "
                                "first.", param="lora_name")
        if self.pending >= self.max_pending:
            raise APIError(429, f"{self.pending} adapter loads are waiting; retry later.", code="too_many_loads",
                           error_type="rate_limit_error", headers={"Retry-After": "1"})
        self._claimed.add(name)
        self.pending += 1
        try:
            async with self._load_lock:
                loop = asyncio.get_running_loop()
                try:
                    run = await loop.run_in_executor(None, open_run, run_dir, RunAccess())
                    self.shared.check(run, name, self.engine.names, show=lambda key: key.name)
                    adapter = self.shared.adapter_name()
                    served = await loop.run_in_executor(None, self.shared.served, run, name, adapter)
                except LoraftError as exc:
                    raise APIError(400, _sentence(exc, run_dir, self.adapters_dir), param="lora_path") from None

                try:
                    await put_in(self.engine, run, served)
                except Exception as exc:
                    from loraft.model import first_line

                    raise APIError(400, f"{Path(path)}: cannot load the adapter ({first_line(exc)}).",
                                   param="lora_path") from None
                return served
        finally:
            self.pending -= 1
            self._claimed.discard(name)

    async def unload(self, name) -> int:
        """Unload `name` once its requests have ended; the number of requests it waited for."""
        name = self.check_name(name, taken=True)
        served = self.engine.models[name]
        if served.adapter is None:
            raise APIError(400, f"'{name}' is the base model, not an adapter.", param="lora_name")
        if served.adapter == self.engine.model.active_adapter:
            raise APIError(400, f"'{name}' holds the shared base's adapter slot (the first run the server started "
                                "with); it stays loaded.", param="lora_name")
        return await take_out(self.engine, served)


async def put_in(engine: Engine, run, served: Served) -> None:
    """Load a run's adapter into the engine's model as `served.adapter` (on the batcher's thread, between two
    steps), then serve it under `served.name`."""

    def load() -> None:
        engine.model.load_adapter(str(run.adapter_dir), adapter_name=served.adapter, is_trainable=False)
        engine.batcher.mixed.forget()

    await asyncio.wrap_future(engine.batcher.call(load))
    engine.add(served)


async def take_out(engine: Engine, served: Served, poll_seconds: float = 0.02) -> int:
    """Stop serving `served` (new requests for its name are refused at once), wait until the requests already on it
    have ended, then delete its adapter's weights; the number of requests it waited for."""
    waited = served.in_flight
    served.unloading = True
    while served.in_flight:
        await asyncio.sleep(poll_seconds)
    if served.adapter is not None:

        def delete() -> None:
            engine.model.delete_adapter(served.adapter)
            engine.batcher.mixed.forget()

        await asyncio.wrap_future(engine.batcher.call(delete))
    engine.models.pop(served.name, None)
    return waited


def _sentence(exc: Exception, run_dir: Path, root: Path) -> str:
    """A load refusal's sentence, with the run's path shown relative to --adapters-dir (no server paths leak)."""
    text = str(exc)
    for shown in (str(run_dir), str(root)):
        text = text.replace(shown + "/", "").replace(shown, str(run_dir.relative_to(root)) if shown == str(run_dir)
                                                     else "--adapters-dir")
    return text.rstrip(".") + "."
