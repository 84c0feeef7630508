"""The configs shipped inside the package: preset names, their files, and the model shapes beside them.

`loraft train NAME` and `loraft config --preset NAME` resolve a preset here; the schema they load into is
loraft.config.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional

from loraft.errors import ConfigError


def preset_names() -> list[str]:
    """Names of the configs shipped inside the package (`loraft train NAME`), sorted."""
    folder = resources.files("loraft").joinpath("configs")
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """The shipped preset `name` as a file path.

    Raises:
        ConfigError: when no preset has that name (the message lists the ones that exist).
    """
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r} (presets: {', '.join(preset_names())})")
    # Wheels install unpacked, so package data is a real file that load_config and the demo can open.
    return Path(str(resources.files("loraft").joinpath(f"configs/{name}.yaml")))


def shipped_shape(name_or_path: str) -> Optional[Path]:
    """A directory holding the shipped `config.json` (architecture only, no weights) of a preset's hub model, or None.

    `loraft inspect --preset` falls back to it where the hub cannot be reached, so what a preset trains can be
    shown offline; the shapes are the models' published configs (`configs/shapes/ORG--NAME/config.json`).
    """
    entry = resources.files("loraft").joinpath(f"configs/shapes/{name_or_path.replace('/', '--')}/config.json")
    return Path(str(entry)).parent if entry.is_file() else None


def resolve_config_source(name_or_path: str | Path) -> Path:
    """What `loraft train CONFIG` reads: an existing file, else a shipped preset's name.

    A bare word (no path separator, no .yaml/.yml suffix) that is not a file names a preset, so
    `loraft train bloom-1b4-zh-lora` works from any directory; anything else is taken as a path.

    Raises:
        ConfigError: for a bare word that is neither a file nor a preset.
    """
    text = str(name_or_path)
    is_bare_word = "/" not in text and os.sep not in text and not text.endswith((".yaml", ".yml"))
    if not is_bare_word or Path(text).is_file():
        return Path(text)
    if text not in preset_names():
        raise ConfigError(f"{text}: no config file or preset by that name (presets: {', '.join(preset_names())})")
    return preset_path(text)
