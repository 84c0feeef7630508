"""llama.cpp's own converter: where it comes from, what it supports, and running it.

loraft does not vendor llama.cpp. The converter tree (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, the
`conversion/` package, `gguf-py/` and the `models/ggml-vocab-*.gguf` test vocabularies) is taken from, in order:
`--llama-cpp DIR` / `$LLAMA_CPP_DIR` (a llama.cpp checkout), else a pinned copy fetched once with pip from the
llama-cpp-python source package on PyPI (which carries llama.cpp under vendor/), checked by its sha256 and cached
under `$LORAFT_HOME/llama.cpp/`. Offline with no copy, one sentence says what to pass.

What the converter supports is read from its source without running it (the architectures its
`ModelBase.register(...)` decorators name; the pre-tokenizer hashes of `get_vocab_base_pre`), so an export stops
before any heavy work when the model or its tokenizer cannot be converted.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from loraft.errors import RunError
from loraft.files import cache_home, pip_download, staged_directory, write_json_atomically

# The pinned converter: llama-cpp-python's sdist vendors llama.cpp with its Python converter tree.
PINNED_PACKAGE = "llama-cpp-python"
PINNED_VERSION = "0.3.36"
PINNED_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
ENV_DIR = "LLAMA_CPP_DIR"
ENV_OFFLINE = "LORAFT_OFFLINE"  # 1: never fetch the converter (loraft ui without --allow-hub)
ENV_QUANTIZE = "LLAMA_QUANTIZE"
STAMP = "loraft_llama_cpp.json"
# What is kept of the source package: the converter and what it imports, the test vocabularies, the license.
KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-",
        "LICENSE")
# BPE pre-tokenizers loraft can vouch for when the converter's hash table does not know a vocabulary: the
# tokenizer.json pre_tokenizer/normalizer that llama.cpp's pre-tokenizer of that name implements, field by field.
KNOWN_PRE_TOKENIZERS = {
    "bloom": {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": " ?[^(\\s|[.,!?…。，、।۔،])]+"}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ]},
    },
}
# Fields of a pre-tokenizer step that change how text is split (trim_offsets only changes offsets).
_SPLITTING_FIELDS = {"ByteLevel": ("type", "add_prefix_space", "use_regex"),
                     "Split": ("type", "pattern", "behavior", "invert")}
FALLBACK_ENV = "LORAFT_GGUF_TOKENIZER_PRE"


@dataclass(frozen=True)
class Converter:
    """A llama.cpp converter tree on disk and where it came from."""

    root: Path
    source: str  # "--llama-cpp", "$LLAMA_CPP_DIR" or "llama-cpp-python==X (pip, sha256 checked)"

    def script(self, name: str) -> Path:
        return self.root / name


def pinned_dir() -> Path:
    return cache_home() / "llama.cpp" / f"{PINNED_PACKAGE}-{PINNED_VERSION}"


def _is_tree(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py").is_dir()


def locate_converter(llama_cpp: Optional[str] = None, fetch: bool = True, log=print) -> Converter:
    """The converter tree to use (see the module docstring for the order); fetches the pinned copy if needed.

    Raises:
        RunError: a given directory is not a llama.cpp tree, or there is no copy and none can be fetched.
    """
    for given, source in ((llama_cpp, "--llama-cpp"), (os.environ.get(ENV_DIR), f"${ENV_DIR}")):
        if given:
            path = Path(given).expanduser()
            if not _is_tree(path):
                raise RunError(f"{path} ({source}): not a llama.cpp tree (no convert_hf_to_gguf.py and gguf-py/)")
            return Converter(path.resolve(), source)
    target = pinned_dir()
    if _is_tree(target) and (target / STAMP).is_file():
        return Converter(target, f"{PINNED_PACKAGE}=={PINNED_VERSION} (pip, sha256 checked)")
    if os.environ.get(ENV_OFFLINE) == "1":  # loraft ui without --allow-hub: what it starts downloads nothing
        raise RunError(_offline_sentence(target) + f" (${ENV_OFFLINE}=1: this process does not download; loraft ui "
                       "sets it unless started with --allow-hub)")
    if not fetch:
        raise RunError(_offline_sentence(target))
    fetch_pinned(target, log)
    return Converter(target, f"{PINNED_PACKAGE}=={PINNED_VERSION} (pip, sha256 checked)")


def _offline_sentence(target: Path) -> str:
    return (f"no llama.cpp converter: pass --llama-cpp DIR (a llama.cpp checkout) or set ${ENV_DIR}, or run once "
            f"with network so loraft can fetch {PINNED_PACKAGE}=={PINNED_VERSION}'s copy into {target}")


def fetch_pinned(target: Path, log=print) -> Path:
    """pip-download the pinned source package, check its sha256, keep the converter tree under `target`."""
    log(f"fetching llama.cpp's converter: {PINNED_PACKAGE}=={PINNED_VERSION} source package (once, ~77 MB)")
    with tempfile.TemporaryDirectory(prefix="loraft-llama-cpp-") as tmp:
        try:
            archive = pip_download(f"{PINNED_PACKAGE}=={PINNED_VERSION}", tmp, source=True)
        except OSError as exc:
            raise RunError(_offline_sentence(target) + f" (pip download failed: {exc})") from None
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != PINNED_SHA256:
            raise RunError(f"{archive.name}: sha256 {digest} is not the pinned {PINNED_SHA256}; not using it")
        with staged_directory(target) as staging:
            _extract_tree(archive, staging)
            write_json_atomically(staging / STAMP, {"package": PINNED_PACKAGE, "version": PINNED_VERSION,
                                                    "sha256": digest})
    return target


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _extract_tree(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 3)
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                continue
            relative = parts[3]
            if not relative.startswith(KEEP) or ".." in Path(relative).parts:
                continue
            destination = into / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)


# ------------------------------------------------------------------------------ what the converter knows
@lru_cache(maxsize=8)
def supported_architectures(root: Path) -> frozenset:
    """The `architectures` names `ModelBase.register(...)` registers in the tree (text models and others)."""
    names: set[str] = set()
    files = sorted((root / "conversion").glob("*.py")) + [root / "convert_hf_to_gguf.py"]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ModelBase"):
                names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return frozenset(names)


@lru_cache(maxsize=8)
def pre_tokenizer_table(root: Path) -> tuple[str, dict]:
    """(chktxt, {sha256 of str(token ids): pre-tokenizer name}) from the converter's `get_vocab_base_pre`."""
    for path in sorted((root / "conversion").glob("*.py")) + [root / "convert_hf_to_gguf.py"]:
        source = path.read_text(encoding="utf-8")
        if "def get_vocab_base_pre" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
                return _read_table(node)
    raise RunError(f"{root}: the converter has no get_vocab_base_pre (an unexpected llama.cpp version)")


def _read_table(function: ast.FunctionDef) -> tuple[str, dict]:
    chktxt, table = None, {}
    for node in ast.walk(function):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "chktxt" and isinstance(node.value, ast.Constant)):
            chktxt = node.value.value
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            compared = node.test.comparators[0] if node.test.comparators else None
            if not (isinstance(node.test.left, ast.Name) and node.test.left.id == "chkhsh"
                    and isinstance(compared, ast.Constant)):
                continue
            for statement in node.body:
                if (isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name)
                        and statement.targets[0].id == "res" and isinstance(statement.value, ast.Constant)):
                    table[compared.value] = statement.value.value
    if chktxt is None:
        raise RunError("the converter's get_vocab_base_pre has no chktxt (an unexpected llama.cpp version)")
    return chktxt, table


def _splitting_form(step):
    """A pre-tokenizer (or normalizer) JSON with only the fields that change how text is split."""
    if isinstance(step, dict):
        if step.get("type") == "Sequence" and "pretokenizers" in step:
            return {"type": "Sequence", "pretokenizers": [_splitting_form(s) for s in step["pretokenizers"]]}
        fields = _SPLITTING_FIELDS.get(step.get("type"))
        return {k: step.get(k) for k in fields} if fields else step
    return step


def matching_known_pre_tokenizer(tokenizer_json: dict) -> Optional[str]:
    """The name of a pre-tokenizer in KNOWN_PRE_TOKENIZERS whose structure `tokenizer.json` has exactly."""
    for name, reference in KNOWN_PRE_TOKENIZERS.items():
        if (tokenizer_json.get("normalizer") == reference["normalizer"]
                and _splitting_form(tokenizer_json.get("pre_tokenizer")) == reference["pre_tokenizer"]):
            return name
    return None


@dataclass(frozen=True)
class TokenizerVerdict:
    """How the converter will name the tokenizer's pre-tokenizer."""

    kind: str  # "sentencepiece", "recognised" (hash in the table) or "fallback" (structurally identical)
    name: Optional[str]  # the pre-tokenizer name written to tokenizer.ggml.pre (None for sentencepiece)
    chkhsh: Optional[str]


def check_tokenizer(model_dir: Path, tokenizer, converter: Converter) -> TokenizerVerdict:
    """Decide, before converting, whether llama.cpp will split text as this tokenizer does.

    A sentencepiece model (tokenizer.model) is converted from its own proto. A BPE tokenizer must either hash
    to an entry of the converter's table or have exactly the structure of a pre-tokenizer loraft knows (then the
    export proves it by comparing tokenizations). Otherwise one sentence says why not.
    """
    if (model_dir / "tokenizer.model").is_file():
        return TokenizerVerdict("sentencepiece", None, None)
    chktxt, table = pre_tokenizer_table(converter.root)
    chkhsh = hashlib.sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()
    if chkhsh in table:
        return TokenizerVerdict("recognised", table[chkhsh], chkhsh)
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise RunError(f"{model_dir}: no tokenizer.json and no tokenizer.model; llama.cpp cannot read this tokenizer")
    fallback = matching_known_pre_tokenizer(json.loads(tokenizer_path.read_text(encoding="utf-8")))
    if fallback is None:
        raise RunError(
            f"{tokenizer_path}: llama.cpp does not recognise this tokenizer's pre-tokenizer (hash {chkhsh[:12]}… is "
            f"not in its table, and its pre_tokenizer/normalizer match none loraft can vouch for: "
            f"{', '.join(KNOWN_PRE_TOKENIZERS)}); the GGUF would split text differently")
    return TokenizerVerdict("fallback", fallback, chkhsh)


# ---------------------------------------------------------------------------------------- running it
# Runs a converter script with get_vocab_base_pre answering the fallback name for a hash it does not know.
_LAUNCHER = """
import os, runpy, sys
root, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(root, "gguf-py"))
sys.path.insert(0, root)
fallback = os.environ.get("{env}")
if fallback:
    from conversion import base
    original = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return fallback
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
""".replace("{env}", FALLBACK_ENV)


def run_converter(converter: Converter, script: str, arguments: Sequence[str], log_path: Path,
                  fallback_pre: Optional[str] = None) -> None:
    """Run one of the converter's scripts in a subprocess; its output goes to `log_path`.

    Raises:
        RunError: the script failed (its last line and the log's path).
    """
    environment = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the launcher puts the tree's own gguf-py first
    environment.pop(FALLBACK_ENV, None)
    if fallback_pre:
        environment[FALLBACK_ENV] = fallback_pre
    command = [sys.executable, "-c", _LAUNCHER, str(converter.root), str(converter.script(script)), *arguments]
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {script} {' '.join(arguments)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    if done.returncode != 0:
        tail = _last_line(log_path.read_text(encoding="utf-8", errors="replace"))
        raise RunError(f"llama.cpp's {script} failed: {tail} (full output: {log_path})")


def find_quantize(llama_cpp: Optional[str] = None) -> Optional[Path]:
    """llama.cpp's `llama-quantize`: $LLAMA_QUANTIZE, a build under the llama.cpp tree, or on PATH."""
    candidates = [os.environ.get(ENV_QUANTIZE)]
    for root in (llama_cpp, os.environ.get(ENV_DIR)):
        if root:
            candidates += [str(Path(root) / "build" / "bin" / "llama-quantize"), str(Path(root) / "llama-quantize")]
    candidates.append(shutil.which("llama-quantize"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def quantize(binary: Path, source: Path, target: Path, kind: str, log_path: Path) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (`llama-quantize SOURCE TARGET KIND`)."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {binary} {source.name} {target.name} {kind}\n")
        log.flush()
        done = subprocess.run([str(binary), str(source), str(target), kind], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = _last_line(log_path.read_text(encoding="utf-8", errors="replace"))
        raise RunError(f"{binary} failed: {tail} (full output: {log_path})")
