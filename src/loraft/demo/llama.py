"""The demo's last step: its run exported to GGUF, verified, and asked a held-out prompt in llama.cpp itself.

Runs when the `gguf` extra is installed; otherwise it prints the install and export commands. A failed export
(offline with no converter copy, say) is reported in one sentence and does not fail the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional


def llama_cpp_step(run_dir: Path, out_dir: Path, conversation: list[dict], transformers_answer: str,
                   log: Callable[[str], None], step: str = "[6/6]", adapter_only: bool = False) -> Optional[dict]:
    """Export `run_dir` to a verified f16 GGUF in `out_dir` (adapter_only: a LoRA GGUF for the run's own base file)
    and show llama.cpp's greedy answer to `conversation` beside transformers'. Returns {"report",
    "llama_cpp_answer"} or None when skipped or failed."""
    from loraft.errors import MissingExtraError, RunError, require

    command = f"loraft export {run_dir} --format gguf" + (" --adapter-only" if adapter_only else "")
    try:
        require("demo's llama.cpp step", "gguf", "xllamacpp", "sentencepiece", "numpy")
    except MissingExtraError as exc:
        log(f"{step} llama.cpp: {exc}; then: {command}")
        return None
    from loraft.export.gguf import export_gguf
    from loraft.export.verify import LlamaCpp, native_output_to

    log(f"{step} GGUF for llama.cpp / Ollama: {command} --out {out_dir}")
    try:
        report = export_gguf(run_dir, out_dir, outtype="f32" if adapter_only else "f16", overwrite=True,
                             adapter_only=adapter_only, conversations=[conversation], log=lambda line: log("  " + line))
    except RunError as exc:
        log(f"  export failed: {exc}")
        return None
    with native_output_to(out_dir / "export.log"):
        files = report["files"]  # adapter mode: the model is the original file (an absolute path)
        llama = LlamaCpp(out_dir / files["model"], out_dir / files["adapter"] if adapter_only else None)
        try:  # the GGUF's own chat template and tokenizer, as llama.cpp and Ollama use them
            ids = llama.tokenize(llama.apply_template(conversation))
            answer = llama.complete(ids, max_tokens=48)
        finally:
            llama.close()
    user = conversation[-1]["content"].replace("\n", " / ")
    log(f"  held-out prompt: {user}")
    log(f"  transformers (base + LoRA): {transformers_answer.strip()!r}")
    shown = f"{Path(files['model']).name} + {files['adapter']}" if adapter_only else files["model"]
    log(f"  llama.cpp ({shown}): {answer.strip()!r}")
    log(f"  Ollama: cd {out_dir} && ollama create loraft-demo -f Modelfile && ollama run loraft-demo")
    return {"report": report, "llama_cpp_answer": answer}
