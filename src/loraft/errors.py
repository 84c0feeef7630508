"""User-facing errors: one clear sentence naming the file, record/line and field.

The CLI prints `error: <message>` for these and exits with status 2; any other exception is our bug
and keeps its traceback.
"""

from __future__ import annotations

import importlib.util
from typing import Optional


class LoraftError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class ConfigError(LoraftError):
    """An unknown config key, a bad value, or an unreadable config file."""


class DataError(LoraftError):
    """Bad training data; the message names the file, the line or record, and the field."""

    def __init__(self, path: str, message: str, where: Optional[str] = None, field: Optional[str] = None):
        location = str(path)
        if where:
            location += f", {where}"
        if field:
            location += f", field {field!r}"
        super().__init__(f"{location}: {message}")
        self.path = path
        self.where = where
        self.field = field


class TemplateError(LoraftError):
    """A chat template that fails on a conversation, or whose supervised text cannot be derived."""


class ModelError(LoraftError):
    """A base model, adapter target or run directory that cannot be used."""


class RunError(LoraftError):
    """A run directory that would be overwritten, or is missing what a command needs."""


class MissingExtraError(LoraftError):
    """A command needs an optional dependency group (a pip extra) that is not installed."""


def require(command: str, extra: str, *modules: str) -> None:
    """Stop before `loraft COMMAND` does any work when modules of its pip extra are not installed.

    Raises:
        MissingExtraError: naming the missing modules and the `pip install 'loraft[EXTRA]'` to run.
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"loraft {command} needs the {extra!r} extra ({', '.join(missing)} not installed): "
                                f"run pip install 'loraft[{extra}]'")
