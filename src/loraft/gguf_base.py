"""A GGUF file as the base model: what transformers' GGUF loader reads of it, done once per file.

`model.name_or_path` may name a local `.gguf` file, the form Ollama, LM Studio and llama.cpp keep models in.
transformers loads one (`from_pretrained(folder, gguf_file=name)`): the weights dequantized, the tokenizer and its
chat template from the file's metadata. That costs seconds to minutes at every command (SmolLM2-135M Q4_1: 4 s for
the config, 4 s for the tokenizer, 13 s for the weights on a 2-core Xeon; docs/benchmarks.md), so loraft does it once:
`hf_folder` writes what transformers read as an ordinary Hugging Face folder under $LORAFT_HOME/gguf/SHA256 (config,
tokenizer with its chat template; with `weights`, `model.DTYPE.safetensors`, loaded as that variant), and every
command loads that folder. A run records the file itself (`identity`: path, size, sha256); `check_unchanged` refuses
to go on from a file that changed or went missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Union

from loraft.errors import ModelError
from loraft.files import cache_dir, staged_directory, write_json_atomically

logger = logging.getLogger("loraft")
SUFFIX = ".gguf"
MAGIC = b"GGUF"  # a GGUF file's first four bytes
STAMP = "loraft_gguf.json"  # in each folder: the file it was read from


def is_gguf(name_or_path: Optional[str]) -> bool:
    """Whether a model name names a GGUF file: by its suffix (whether it exists is `gguf_file`'s to say), or an
    existing file that starts with GGUF's magic (Ollama keeps its models as `blobs/sha256-...`, with no suffix)."""
    if not name_or_path:
        return False
    if str(name_or_path).lower().endswith(SUFFIX):
        return True
    path = Path(str(name_or_path)).expanduser()
    try:
        with path.open("rb") as handle:
            return path.is_file() and handle.read(4) == MAGIC
    except OSError:  # a hub id, a folder, a name that is no file
        return False


def gguf_file(name_or_path: str) -> Path:
    """The GGUF file a model name names, absolute; one sentence when there is none."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ModelError(f"{name_or_path}: GGUF file not found (model.name_or_path)")
    return path.resolve()


def sha256(path: Path) -> str:
    """The file's sha256, read once per (path, size, modification time): a 4 GB model takes seconds to hash."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    known_file = cache_dir("gguf") / "sha256.json"
    try:
        known = json.loads(known_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    known_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(known_file, {**known, key: digest.hexdigest()})
    return digest.hexdigest()


def identity(name_or_path: str) -> Optional[dict]:
    """What a run records of its GGUF base: {"path", "size", "sha256"}; None for any other base."""
    if not is_gguf(name_or_path):
        return None
    path = gguf_file(name_or_path)
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256(path)}


def check_unchanged(recorded: Optional[dict], what: str) -> None:
    """Refuse (one sentence naming the file) to go on from a GGUF base that is missing or is not the file `recorded`
    (a run's identity) was trained on.

    Args:
        what: who asks, for the sentence ("run runs/x").
    """
    if not recorded:
        return
    path = Path(recorded["path"])
    if not path.is_file():
        raise ModelError(f"{path}: the GGUF file {what} was trained on is missing; put it back, or train again")
    if path.stat().st_size != recorded.get("size") or sha256(path) != recorded.get("sha256"):
        raise ModelError(f"{path}: the GGUF file changed since {what} was trained on it (sha256 "
                         f"{recorded.get('sha256', '?')[:12]}..., now {sha256(path)[:12]}...); the adapter belongs to "
                         "the old file: put it back, or train again")


# GGUF metadata value types (the format's spec): the struct code of each fixed-size one, and the other two
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def header_fields(path: Path, keys: set[str]) -> dict:
    """The scalar or string metadata values of `keys` in the GGUF file's header, read up to the last of them.

    gguf's GGUFReader parses every field, the tokenizer's arrays of tens of thousands of strings included: 2.1-2.3 s
    for SmolLM2's file on a 2-core Zen 4, where this takes 0.04 s for all its scalar keys (benchmarks/gguf_base.py
    --header; docs/benchmarks.md). It reads the key-value section in order and stops once it has `keys`, stepping
    over arrays without decoding them. Missing keys are absent.
    Raises ValueError for a file that is not little-endian GGUF version 2 or 3, or is cut short."""
    import struct

    found: dict = {}
    with open(path, "rb") as handle:

        def read(size: int) -> bytes:
            data = handle.read(size)
            if len(data) != size:
                raise ValueError("the header is cut short")
            return data

        def number(code: str):
            return struct.unpack("<" + code, read(struct.calcsize(code)))[0]

        def string() -> bytes:
            return read(number("Q"))

        def skip(kind: int) -> None:
            if kind == _STRING:
                handle.seek(number("Q"), os.SEEK_CUR)
            elif kind == _ARRAY:
                item, count = number("I"), number("Q")
                if item in _SCALARS:
                    handle.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in _SCALARS:
                handle.seek(struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)
            else:
                raise ValueError(f"unknown metadata value type {kind}")

        if read(4) != MAGIC:
            raise ValueError("no GGUF magic")
        version = number("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (loraft reads 2 and 3)")
        number("Q")  # tensor count
        for _ in range(number("Q")):
            key, kind = string().decode("utf-8"), number("I")
            if key in keys and kind == _STRING:
                found[key] = string().decode("utf-8")
            elif key in keys and kind in _SCALARS:
                found[key] = number(_SCALARS[kind])
            else:
                skip(kind)
            if len(found) == len(keys):
                break
    return found


def architecture(path: Path) -> str:
    """The file's `general.architecture`, refused in one sentence when transformers cannot load it from GGUF."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        name = header_fields(path, {"general.architecture"})["general.architecture"]
    except (KeyError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a GGUF file transformers can read ({exc})") from None
    supported = sorted(arch for arch in GGUF_SUPPORTED_ARCHITECTURES if arch not in ("general", "tokenizer"))
    if name not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{path}: transformers cannot load the {name!r} architecture from GGUF (it loads "
                         f"{', '.join(supported)})")
    return name


def file_type(path: Path) -> str:
    """The file's weight type as llama.cpp names its outtypes (`general.file_type`): q4_1, q8_0, f16, q4_k_m..."""
    from gguf import LlamaFileType

    value = header_fields(path, {"general.file_type"}).get("general.file_type")
    if value is None:
        return "unknown"
    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _cached_folder(path: Path) -> Path:
    return cache_dir("gguf") / sha256(path)[:16]


def hf_folder(name_or_path: str, weights: Optional[str] = None, log=None) -> Path:
    """The Hugging Face folder of a GGUF file: config and tokenizer (with the file's chat template) read once from
    its metadata; with `weights` (fp32, bf16 or fp16) also the dequantized weights in that dtype, saved as that
    variant (`model.fp32.safetensors`). Built once per file content, under $LORAFT_HOME/gguf/.

    Returns:
        the folder: AutoConfig and AutoTokenizer load it; AutoModelForCausalLM with `variant=weights`.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    log = log or logger.info
    path = gguf_file(name_or_path)
    folder = _cached_folder(path)
    if not (folder / STAMP).is_file():
        architecture(path)
        started = time.time()
        log(f"GGUF base {path.name}: reading its config and tokenizer (once, into {folder})")
        with staged_directory(folder, merge=True, label="gguf") as staging:  # the stamp last: a complete folder
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            tokenizer.save_pretrained(str(staging))
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            if not getattr(config, "architectures", None):  # a GGUF names no class; an ordinary config.json does
                config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
            config.save_pretrained(str(staging))
            write_json_atomically(staging / STAMP, {"source": str(path), "size": path.stat().st_size,
                                                    "sha256": sha256(path), "seconds": round(time.time() - started,
                                                                                             1)})
    if weights is not None and not any(folder.glob(f"model.{weights}*.safetensors")):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[weights]
        started = time.time()
        log(f"GGUF base {path.name}: dequantizing its weights to {weights} (once, into {folder})")
        # the config saved above, not another parse of the metadata (SmolLM2 on a Zen 4: 9.3 s instead of 12.4 s;
        # benchmarks/gguf_base.py --dequantize)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     config=AutoConfig.from_pretrained(str(folder)))
        # transformers marks a model loaded from GGUF as quantized and will not save it; its tensors are plain
        # dequantized ones: written with safetensors, a tied weight once (under its first name, the embedding)
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if (tensor.data_ptr(), tuple(tensor.shape)) not in seen:
                seen.add((tensor.data_ptr(), tuple(tensor.shape)))
                tensors[name] = tensor.contiguous()
        target = folder / f"model.{weights}.safetensors"
        partial = folder / f".{target.name}.{os.getpid()}.tmp"  # renamed into place: a cut-off file is never read
        save_file(tensors, str(partial), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # as any file this user writes: the cache may be shared
        os.replace(partial, target)
        log(f"GGUF base {path.name}: dequantized in {time.time() - started:.0f}s")
    return folder


def resolve(name_or_path: str, weights: Optional[str] = None, log=None) -> Union[str, Path]:
    """What transformers should load for `name_or_path`: a GGUF file's folder (`hf_folder`), else the name as it is.
    The one call every loader of loraft makes before `from_pretrained`."""
    return str(hf_folder(name_or_path, weights, log)) if is_gguf(name_or_path) else name_or_path
