"""Record kinds: what a data file holds, decided once, and the module that reads, checks, previews and encodes it.

Each module has the same interface: KIND, check(path, settings, tokenizer), preview(path, settings, tokenizer,
limit), format_report(report), format_sample(sample).
"""

from __future__ import annotations

import importlib

from loraft.records import PREFERENCE_FORMATS, source_format

# record kind -> the module that reads, checks, previews and encodes it: check(path, settings, tokenizer),
# preview(path, settings, tokenizer, limit), format_report(report), format_sample(sample)
RECORD_KINDS = {"conversations": "loraft.data", "preferences": "loraft.preference", "prompts": "loraft.prompts"}


def record_kind(settings):
    """The module of the records in `settings.data.path` (a RunConfig): prompt-only records for train.objective=grpo,
    else its data.format, or detected from the first record. `loraft data check/preview` and the UI's data page call
    this once per request."""
    if settings.train.objective == "grpo":
        return importlib.import_module(RECORD_KINDS["prompts"])
    kind = "preferences" if source_format(settings.data.path, settings.data) in PREFERENCE_FORMATS else "conversations"
    return importlib.import_module(RECORD_KINDS[kind])
