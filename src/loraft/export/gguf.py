"""`loraft export RUN --format gguf`: a run as a GGUF file for llama.cpp, Ollama and LM Studio, verified.

Order of work, cheapest first, so a run that cannot be exported stops in seconds with one sentence:
1. checks: the run, the converter (loraft.export.llamacpp), the base architecture in the converter's registry, the
   tokenizer's pre-tokenizer (recognised, or structurally identical to one loraft vouches for), the adapter for
   --adapter-only (no fully trained modules, no DoRA, no per-module ranks), a quantizer for q4_k_m, the extras;
2. merge (loraft.export.merge: fp32, a trained tied embedding untied, the template as chat_template);
3. convert with llama.cpp's own convert_hf_to_gguf.py (and convert_lora_to_gguf.py for --adapter-only; an rsLoRA
   adapter gets alpha·√r, since llama.cpp scales every adapter by alpha/r); q4_k_m through llama-quantize;
4. the Ollama Modelfile (loraft.export.ollama);
5. verification with llama.cpp itself (loraft.export.verify) against the merged model; the numbers go to
   export_report.json, and the export fails when a tolerance is exceeded.
Everything is written in a staging directory and moved into --out as a whole.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from loraft import gguf_base
from loraft.errors import RunError
from loraft.files import staged_directory, write_json_atomically, write_text_atomically

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTIZER_TYPES = {"q4_k_m": "Q4_K_M"}  # need llama.cpp's llama-quantize
REPORT_FILE = "export_report.json"
LOG_FILE = "export.log"


def default_out_dir(run_dir: Path, adapter_only: bool) -> Path:
    return run_dir.parent / f"{run_dir.name}-gguf{'-adapter' if adapter_only else ''}"


def _adapter_problem(adapter: dict) -> Optional[str]:
    """Why a peft adapter cannot become a llama.cpp LoRA GGUF (None when it can)."""
    if adapter.get("peft_type") != "LORA":
        return f"a {adapter.get('peft_type')} adapter is not a LoRA"
    if adapter.get("modules_to_save"):
        return (f"it trains {', '.join(adapter['modules_to_save'])} in full (modules_to_save), which a LoRA GGUF "
                "cannot carry")
    if adapter.get("use_dora"):
        return "it is a DoRA adapter, which llama.cpp does not apply"
    if adapter.get("rank_pattern") or adapter.get("alpha_pattern"):
        return "it has per-module ranks or alphas (rank_pattern/alpha_pattern), which llama.cpp's adapter format lacks"
    if adapter.get("bias", "none") != "none":
        return f"it trains biases (bias={adapter['bias']!r}), which a LoRA GGUF cannot carry"
    return None


def llama_cpp_adapter_config(adapter: dict) -> tuple[dict, Optional[str]]:
    """adapter_config.json as llama.cpp must read it: it scales every adapter by alpha/r, so an rsLoRA adapter
    (scaled by alpha/√r in peft) is written with alpha·√r. Returns (config, note or None)."""
    if not adapter.get("use_rslora"):
        return adapter, None
    r, alpha = adapter["r"], adapter["lora_alpha"]
    rescaled = dict(adapter, lora_alpha=alpha * math.sqrt(r), use_rslora=False)
    return rescaled, (f"rsLoRA: lora_alpha {alpha} written as {alpha}·√{r} = {rescaled['lora_alpha']:.6g}, so "
                      "llama.cpp's alpha/r equals peft's alpha/√r")


def _base_architecture(config) -> str:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(gguf_base.resolve(config.model.name_or_path),
                                                  revision=config.model.revision,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise RunError(f"{config.model.name_or_path}: cannot read the base model's config ({str(exc).splitlines()[0]})")
    architectures = getattr(model_config, "architectures", None) or []
    if not architectures:
        # a config built in code (tests, the demo) may not name its class: the model type's causal-LM class does
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_config.model_type)
        architectures = [name] if name else []
    if not architectures:
        raise RunError(f"{config.model.name_or_path}: its config names no architecture")
    return architectures[0]


def _task_prompts(config, log, count: int = 3) -> list[list[dict]]:
    """The prompts of the run's first training records (their last user turn's conversation, without the answer):
    where the adapter changed the model, so the check sees it (on the fixed probes alone, a narrow adapter moves
    less than a 4-bit base's rounding). None where the data cannot be read any more (moved, a hub id offline)."""
    from loraft.errors import LoraftError
    from loraft.records import load_conversations

    try:
        conversations = load_conversations(config.data.path, config.data.model_copy(update={"limit": count}))
    except (LoraftError, OSError) as exc:
        log(f"export: the run's training data is not readable ({exc}); verifying on the fixed prompts only")
        return []
    prompts = []
    for conversation in conversations:
        messages = list(conversation["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if messages and messages[-1]["role"] == "user":
            prompts.append(messages)
    return prompts


def _save_base(run, directory: Path, tokenizer, template) -> None:
    """The run's base model as a local directory the converter reads (for --adapter-only)."""
    import torch

    from loraft.model import load_base_model

    model = load_base_model(run.config.model.model_copy(update={"quantization": "none"}), torch.float32)
    model.save_pretrained(str(directory))
    tokenizer.chat_template = template.jinja
    tokenizer.save_pretrained(str(directory))


def export_gguf(
    run_dir: Union[str, Path],
    out_dir: Optional[Union[str, Path]] = None,
    outtype: str = "f16",
    adapter_only: bool = False,
    llama_cpp: Optional[str] = None,
    verify: bool = True,
    overwrite: bool = False,
    access=None,
    conversations: Optional[Sequence[Sequence[dict]]] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Export a finished run to GGUF (merged, or base + LoRA adapter), write a Modelfile, verify with llama.cpp.

    Args:
        run_dir: a finished LoRA run directory.
        out_dir: where to write (default: RUN-gguf beside the run); must be empty or absent unless `overwrite`.
        outtype: f32, f16, bf16, q8_0 (the converter's) or q4_k_m (needs llama-quantize).
        adapter_only: write the base GGUF and a LoRA adapter GGUF instead of a merged model.
        llama_cpp: a llama.cpp tree (else $LLAMA_CPP_DIR, else the pinned copy).
        verify: compare the GGUF with the merged model in llama.cpp (needs the `gguf` extra).
        conversations: extra prompts for the verification (added to the fixed probe set).
    Returns:
        the report (also written to OUT/export_report.json).
    Raises:
        RunError: one sentence when the run cannot be exported, or when verification fails (after writing).
    """
    from loraft.errors import require
    from loraft.export import llamacpp, verify as verification
    from loraft.export.merge import _check_out_dir, merge_run
    from loraft.export.ollama import modelfile
    from loraft.model import load_tokenizer
    from loraft.run_access import RunAccess, open_run
    from loraft.templates import get_template

    started = time.time()
    run_dir = Path(run_dir)
    if outtype not in OUTTYPES:
        raise RunError(f"--outtype must be one of {', '.join(OUTTYPES)} (got {outtype!r})")
    run = open_run(run_dir, access or RunAccess())
    out_dir = Path(out_dir) if out_dir else default_out_dir(run_dir, adapter_only)
    _check_out_dir(run_dir, out_dir, overwrite)
    require("export --format gguf", "gguf", "numpy", "sentencepiece", *(["xllamacpp"] if verify else []))
    config = run.config
    if config.adapter.method not in ("lora", "ia3") or (adapter_only and config.adapter.method != "lora"):
        raise RunError(f"{run_dir}: a {config.adapter.method} adapter cannot be exported to GGUF"
                       + ("" if config.adapter.method == "ia3" else "; serve the run directory with loraft serve"))
    adapter_json = json.loads((run.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_note = None
    if adapter_only:
        problem = _adapter_problem(adapter_json)
        if problem:
            raise RunError(f"{run_dir}: --adapter-only is not possible because {problem}; export the merged model "
                           f"instead (loraft export {run_dir} --format gguf)")
        adapter_json, adapter_note = llama_cpp_adapter_config(adapter_json)
    quantizer = None
    if outtype in QUANTIZER_TYPES:
        quantizer = llamacpp.find_quantize(llama_cpp)
        if quantizer is None:
            raise RunError(
                f"--outtype {outtype} needs llama.cpp's quantizer and none was found: put llama-quantize on PATH, "
                f"set ${llamacpp.ENV_QUANTIZE}, or pass --llama-cpp DIR with a build (DIR/build/bin/llama-quantize); "
                "f32, f16, bf16 and q8_0 need no build")
    converter = llamacpp.locate_converter(llama_cpp, log=log)
    architecture = _base_architecture(config)
    if architecture not in llamacpp.supported_architectures(converter.root):
        raise RunError(f"{config.model.name_or_path}: llama.cpp's converter ({converter.source}) does not support "
                       f"the {architecture} architecture")
    tokenizer = load_tokenizer(str(run.adapter_dir))
    template = get_template(run.record.get("template") or config.data.template, tokenizer)
    verdict = llamacpp.check_tokenizer(run.adapter_dir, tokenizer, converter)
    log(f"export: {architecture}, tokenizer {verdict.kind}"
        + (f" as llama.cpp's {verdict.name!r} pre-tokenizer" if verdict.name else "") + f"; converter {converter.source}")

    # a run on a GGUF file: its adapter goes back onto that very file, which is not converted or copied
    original = gguf_base.gguf_file(config.model.name_or_path) if gguf_base.is_gguf(config.model.name_or_path) else None
    base_type = gguf_base.file_type(original) if original is not None and adapter_only else None
    report: dict = {
        "run_dir": str(run_dir.resolve()), "format": "gguf", "outtype": outtype,
        "mode": "adapter" if adapter_only else "merged", "architecture": architecture,
        "converter": {"source": converter.source, "root": str(converter.root)},
        "tokenizer": {"kind": verdict.kind, "pre_tokenizer": verdict.name, "chkhsh": verdict.chkhsh},
        "template": template.name, "notes": [n for n in [adapter_note] if n],
    }
    with staged_directory(out_dir, merge=True, label="gguf") as staging:
        work = staging / ".work"
        work.mkdir()
        log_path = staging / LOG_FILE
        merged_dir = work / "merged"
        log("export: merging the adapter into the base (fp32)")
        merge_run(run_dir, merged_dir, dtype="fp32", access=access)
        fallback = verdict.name if verdict.kind == "fallback" else None
        files: dict = {}
        # the model file: the merged model, or with --adapter-only the base the adapter applies to
        source_dir, stem = (work / "base", "base") if adapter_only else (merged_dir, "model")
        if base_type is not None:  # the user's own file; the converter needs only its config (the cached folder)
            source_dir, model_path = gguf_base.hf_folder(config.model.name_or_path, log=log), original
            report["base"] = {"path": str(original), "file_type": base_type,
                              "sha256": gguf_base.sha256(original)}
            log(f"export: the base is the run's own GGUF file ({original.name}, {base_type}), unchanged")
        else:
            if adapter_only:
                _save_base(run, source_dir, tokenizer, template)
            model_path = staging / f"{stem}-{outtype}.gguf"
            convert_type = "f16" if outtype in QUANTIZER_TYPES else outtype
            converted = model_path if convert_type == outtype else work / f"{stem}-{convert_type}.gguf"
            log(f"export: converting {'the base ' if adapter_only else ''}to {convert_type} with llama.cpp's "
                "convert_hf_to_gguf.py")
            llamacpp.run_converter(converter, "convert_hf_to_gguf.py",
                                   [str(source_dir), "--outfile", str(converted), "--outtype", convert_type],
                                   log_path, fallback)
            if converted != model_path:
                log(f"export: quantizing to {outtype} with {quantizer}")
                llamacpp.quantize(quantizer, converted, model_path, QUANTIZER_TYPES[outtype], log_path)
                report["quantizer"] = str(quantizer)
        lora_path = None
        if adapter_only:
            lora_source = work / "adapter"
            lora_source.mkdir()
            for name in ("adapter_model.safetensors", "adapter_model.bin"):
                if (run.adapter_dir / name).is_file():
                    shutil.copy2(run.adapter_dir / name, lora_source / name)
            write_json_atomically(lora_source / "adapter_config.json", adapter_json)
            lora_path = staging / "adapter-f32.gguf"
            log("export: converting the adapter with llama.cpp's convert_lora_to_gguf.py")
            llamacpp.run_converter(converter, "convert_lora_to_gguf.py",
                                   ["--base", str(source_dir), "--outfile", str(lora_path), "--outtype", "f32",
                                    str(lora_source)], log_path, fallback)
            files["adapter"] = lora_path.name
        files["model"] = str(model_path) if base_type is not None else model_path.name
        report["files"] = {**files, "bytes": {k: (staging / v).stat().st_size for k, v in files.items()}}

        # Ollama reads FROM relative to the Modelfile: the user's own file by its absolute path
        text, notes = modelfile(str(model_path) if base_type is not None else f"./{model_path.name}", template,
                                tokenizer.eos_token, adapter_path=f"./{lora_path.name}" if lora_path else None)
        write_text_atomically(staging / "Modelfile", text)
        report["notes"] += notes
        report["files"]["modelfile"] = "Modelfile"

        if verify:
            log("export: verifying with llama.cpp (xllamacpp) against the merged model in transformers")
            probes = [*verification.PROBE_CONVERSATIONS, *_task_prompts(config, log),
                      *(list(c) for c in (conversations or []))]
            reference = verification.Reference.load(merged_dir)
            weights = base_type or outtype  # what llama.cpp computes with: the tolerance is that type's
            result = verification.verify_gguf(model_path, merged_dir, weights, log_path, lora_path=lora_path,
                                              conversations=probes, reference=reference)
            if adapter_only:  # the same base without its adapter: how much the adapter moves the numbers
                control = verification.verify_gguf(model_path, merged_dir, weights, log_path, conversations=probes,
                                                   reference=reference)
                result["base_without_adapter_max_abs_diff"] = control["logprob_max_abs_diff"]
                log(f"  negative control: the base GGUF without the adapter differs by "
                    f"{control['logprob_max_abs_diff']:.3f} (the adapter is what the check sees)")
            report["verify"] = result
            for line in verification.format_report(result):
                log(line)
        else:
            report["verify"] = None
        report["seconds"] = round(time.time() - started, 1)
        write_json_atomically(staging / REPORT_FILE, report)
        shutil.rmtree(work)
        if overwrite:  # only now that the new export is complete: no GGUF of an earlier export is left beside it
            for stale in out_dir.glob("*.gguf"):
                stale.unlink()
    if verify and not report["verify"]["passed"]:
        checked = model_path if base_type is not None else out_dir / model_path.name
        raise RunError(f"{checked}{' + ' + str(out_dir / lora_path.name) if lora_path else ''}: verification failed "
                       f"(log-prob difference "
                       f"{report['verify']['logprob_max_abs_diff']:.4g} vs tolerance {report['verify']['tolerance']}, "
                       f"tokenization {report['verify']['tokenization']['equal']}/"
                       f"{report['verify']['tokenization']['strings']} equal); see {out_dir / REPORT_FILE}")
    written = sorted(Path(report["files"][k]).name for k in files if not (base_type and k == "model"))
    log(f"export: wrote {out_dir} ({', '.join(written)}, Modelfile, {REPORT_FILE}) in {report['seconds']:.0f}s")
    if base_type is not None:
        log(f"  llama.cpp: llama-cli -m {original} --lora {out_dir / lora_path.name}")
        log(f"  Ollama:    ollama create NAME -f {out_dir / 'Modelfile'}   (FROM your file, ADAPTER the LoRA)")
    return report
