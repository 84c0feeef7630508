"""Many runs on one base: which runs can share a base copy and a mixed batch, loading them at start, and loading
and unloading them while the server runs (vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`).

Runs share the base when their `model` settings name the same weights (path, revision, quantization) and their
tokenizers have the same vocabulary. A batch may mix LoRA adapters, with or without `modules_to_save` (peft's
`adapter_names` covers Linear and Embedding layers and the saved modules' copies); DoRA, IA3, prompt tuning and
prefix tuning cannot join one (peft refuses DoRA in a mixed batch; the others have no per-row path), so a server of
several runs refuses them, and serves them alone.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from loraft.errors import RunError
from loraft.serve.engine import Engine, Served

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

    def check(self, run, name: str, taken: Sequence[str]) -> None:
        where = run.run_dir
        if name in taken:
            raise RunError(f"{where}: the name {name!r} is served already (runs are served under their directory's "
                           "name: rename one, or give it another name)")
        key = base_key(run)
        if key != self.key:
            raise RunError(f"{where}: its base is {key}, not the {self.key} this server shares: serve it from a server "
                           "of its own")
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
    model, tokenizer, template, info = load_run(first, device=device, dtype=dtype)
    shared = RunsOnOneBase(base_key(first), tokenizer, info["dtype"])
    if len(runs) > 1:
        taken: list[str] = []
        for run, name in zip(runs, names):  # every run checked before more weights load
            shared.check(run, name, taken)
            taken.append(name)
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
