"""The tokenized-data cache every record kind uses (conversations in loraft.data, preferences in loraft.preference).

An entry is a datasets save plus its report, keyed by what the samples depend on: the source's content, the
tokenizer, the template's Jinja, data's encoding fields, and a kind's own `variant`. Entries are written atomically,
so torchrun's ranks share one: rank 0 tokenizes, the others read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from loraft.config import DataConfig
from loraft.errors import DataError
from loraft.files import cache_dir, staged_directory, tree_fingerprint
from loraft.records import load_hub_dataset
from loraft.templates import Template

logger = logging.getLogger(__name__)

# Bump when tokenization or the stored columns change, so old cache entries are not reused.
DATA_VERSION = 2


def cache_root(data: DataConfig) -> Path:
    return Path(data.cache_dir).expanduser() if data.cache_dir else cache_dir("tokenized")


def _source_fingerprint(path: str, data: DataConfig) -> str:
    local = Path(path).expanduser()
    digest = hashlib.sha256()
    if local.is_file():
        try:
            with open(local, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:  # no permission, or loraft ui's kernel confinement: as sources.py says it
            raise DataError(path, f"cannot be read ({exc.strerror or exc})") from None
    elif local.is_dir():  # save_to_disk shards can be GBs: names, sizes and mtimes identify a save
        return tree_fingerprint(local)  # the same digest as before it moved to files.py: cache keys are unchanged
    else:
        digest.update(f"hub|{path}|{data.split}|{load_hub_dataset(path, data)._fingerprint}".encode())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{specials}|{body}".encode()).hexdigest()


def _cache_key(path: str, data: DataConfig, tokenizer, template: Template) -> str:
    fields = {"format", "max_length", "split", "instruction_field", "input_field", "output_field", "system_field",
              "history_field", "messages_field", "system_prompt", "limit"}
    parts = {
        "version": DATA_VERSION, "source": _source_fingerprint(path, data),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        # the Jinja source is the template: an edit to it (or another model's template) is another key
        "template": [template.name, hashlib.sha256(template.jinja.encode()).hexdigest()],
        "data": data.model_dump(include=fields),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _store(entry: Path, dataset, report: dict) -> None:
    """Write a cache entry atomically: it appears whole at once, and a racing writer's copy (another torchrun
    rank that finished first) is kept and this one discarded."""
    with staged_directory(entry, keep_existing=True) as staging:
        dataset.save_to_disk(str(staging))
        (staging / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")


def cached_tokens(path: str, data: DataConfig, tokenizer, template: Template, build: Callable[[], tuple[Any, dict]],
                  variant: str = "") -> tuple[Any, dict]:
    """The tokenized-data cache every record kind uses: (dataset, report) for one source, built by `build()` only
    when these inputs were not seen (the source's content, the tokenizer, the template, data's encoding fields, and
    `variant`: whatever else the encoding depends on).

    An entry is written whole at once and a racing writer's copy kept, so under torchrun rank 0 builds it (inside
    main_process_first) and the other ranks read it. The report gets `fingerprint` (what the samples depend on: a
    resume compares it) and `cache_hit`.
    """
    from datasets import load_from_disk

    key = _cache_key(path, data, tokenizer, template)
    if variant:
        key = hashlib.sha256(f"{key}|{variant}".encode()).hexdigest()[:32]
    entry = cache_root(data) / key
    if (entry / "report.json").exists():
        report = json.loads((entry / "report.json").read_text(encoding="utf-8"))
        hit = {"path": path, "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "cache_hit": True,
               "fingerprint": key}
        return load_from_disk(str(entry)), {**report, **hit}
    dataset, report = build()
    report["fingerprint"] = key
    try:
        _store(entry, dataset, report)
    except OSError as exc:
        logger.warning("could not cache tokenized data in %s (%s); continuing without the cache", entry, exc)
        return dataset, {**report, "cache_hit": False}
    return load_from_disk(str(entry)), {**report, "cache_hit": False}
