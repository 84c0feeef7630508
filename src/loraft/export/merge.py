"""Merge a run's adapter into its base model and write a standalone model directory.

peft owns the merge (`merge_and_unload`); this module checks the target directory, keeps a trained copy of
a tied embedding untied so a reload computes the same function, writes safetensors (sharded when large)
and the tokenizer with the training template as `chat_template`. It also lists what keeps vLLM from
loading a run's adapter directory directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from loraft.errors import RunError
from loraft.precision import DTYPES
from loraft.files import staged_directory, write_json_atomically

MERGE_DTYPES = DTYPES
MERGE_FILE = "loraft_merge.json"
MERGEABLE_METHODS = ("lora", "ia3")


def _check_out_dir(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.resolve() == run_dir.resolve():
        raise RunError(f"{out_dir}: --out must not be the run directory itself")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise RunError(f"{out_dir}: exists and is not empty; choose another --out or pass --overwrite")


def _tie_setting(model) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


def _untie_trained_embeddings(model, was_tied: bool) -> Optional[dict]:
    """Record in the config that input and output embeddings are now separate tensors.

    With modules_to_save on a tied embedding (BLOOM's word_embeddings), the merged model uses the trained
    copy for the input side and the frozen base weight for lm_head. Saved with tie_word_embeddings=True,
    a reload would re-bind lm_head to the trained copy and compute another function (peft issue #2777),
    so both tensors are written and the tie is switched off. (Recent peft versions switch it off in
    merge_and_unload already; this does not rely on that.)
    """
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    if input_embeddings is None or output_embeddings is None:
        return None
    if output_embeddings.weight is input_embeddings.weight:
        return None
    configs = [model.config]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None and text_config is not model.config:
        configs.append(text_config)
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    if not was_tied:
        return None
    return {"tie_word_embeddings": False, "reason": "a trained copy of a tied embedding; lm_head keeps its own weight"}


def _clear_previous_model_files(out_dir: Path) -> None:
    """With --overwrite, drop the weights of an earlier export so no stale shard is left beside new ones."""
    for path in out_dir.glob("model*.safetensors*"):
        path.unlink()
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json", MERGE_FILE):
        (out_dir / name).unlink(missing_ok=True)


def merge_run(
    run_dir: Union[str, Path],
    out_dir: Union[str, Path],
    dtype: str = "fp32",
    overwrite: bool = False,
    max_shard_size: Union[str, int] = "2GB",
    access=None,
) -> Path:
    """Merge the run's adapter into its base and save a model `AutoModelForCausalLM.from_pretrained` loads.

    Args:
        run_dir: a finished LoRA (or IA3) run directory.
        out_dir: where to write; must be empty or absent unless `overwrite`.
        dtype: weights dtype on disk: fp32, bf16 or fp16 (the merge itself runs in fp32).
        overwrite: write into a non-empty directory, replacing an earlier export's weights.
        max_shard_size: safetensors shard size (transformers' format, e.g. "2GB").
    Returns:
        out_dir.
    """
    from loraft.generate import stop_token_ids
    from loraft.model import load_run_model
    from loraft.templates import get_template
    from loraft.run_access import RunAccess, open_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = open_run(run_dir, access or RunAccess())
    if dtype not in MERGE_DTYPES:
        raise RunError(f"--dtype must be one of {', '.join(MERGE_DTYPES)} (got {dtype!r})")
    method = run.config.adapter.method
    if method not in MERGEABLE_METHODS:
        raise RunError(
            f"{run_dir}: a {method} adapter adds virtual tokens and cannot be merged into the weights; "
            "serve the run directory with loraft serve instead"
        )
    _check_out_dir(run_dir, out_dir, overwrite)

    # merged on the CPU in fp32: exact, and the merged copy never competes with a GPU's memory
    # a QLoRA run merges into the unquantized base: merging into 4-bit weights would round the update away
    model, tokenizer = load_run_model(run, dtype=torch.float32, device="cpu", quantized=False)
    config = run.config
    template = get_template(run.record.get("template") or config.data.template, tokenizer)
    was_tied = _tie_setting(model.get_base_model())
    merged = model.merge_and_unload()
    untied = _untie_trained_embeddings(merged, was_tied)
    merged = merged.to(MERGE_DTYPES[dtype])
    merged.config.dtype = MERGE_DTYPES[dtype]
    # Plain `generate` on the merged model should stop where loraft's generation stops.
    stops = stop_token_ids(tokenizer, template)
    merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.chat_template = template.jinja

    with staged_directory(out_dir, merge=True, label="merge") as staging:
        merged.save_pretrained(str(staging), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(staging))
        write_json_atomically(staging / MERGE_FILE, {
            "run_dir": str(run_dir.resolve()), "base_model": config.model.name_or_path, "template": template.name,
            "dtype": dtype, "adapter_method": config.adapter.method, "untied_embeddings": untied})
        if overwrite:  # only once the new model is complete: a failed merge leaves the old one as it was
            _clear_previous_model_files(out_dir)
    return out_dir


def vllm_adapter_problems(run_dir: Union[str, Path], max_lora_rank: int = 16) -> list[str]:
    """What keeps vLLM's LoRA loader from serving this adapter directory as it is (empty list = none).

    Mirrors vLLM's checks (vllm/lora/peft_helper.py and lora_model.py): adapter_config.json must carry
    r, lora_alpha and target_modules; modules_to_save must be empty; DoRA and adapter biases are not
    loaded; r must not exceed --max-lora-rank (16 by default); the weights are read from
    adapter_model.safetensors and may hold only lora_A / lora_B tensors.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "adapter_config.json"
    weights_path = run_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        return [f"{config_path}: missing"]
    adapter = json.loads(config_path.read_text(encoding="utf-8"))
    problems = []
    if adapter.get("peft_type") != "LORA":
        problems.append(f"peft_type is {adapter.get('peft_type')}; vLLM loads LoRA adapters only")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in adapter]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)}")
    if adapter.get("modules_to_save"):
        problems.append(
            f"modules_to_save is {adapter['modules_to_save']}; vLLM only loads adapters without it "
            "(serve a `loraft merge` output instead)"
        )
    if adapter.get("use_dora"):
        problems.append("use_dora is true; vLLM does not load DoRA adapters")
    if adapter.get("bias", "none") != "none":
        problems.append(f"bias is {adapter['bias']!r}; vLLM expects bias 'none'")
    if isinstance(adapter.get("r"), int) and adapter["r"] > max_lora_rank:
        problems.append(f"r is {adapter['r']}; start vLLM with --max-lora-rank {adapter['r']} or more")
    if not weights_path.is_file():
        problems.append(f"{weights_path.name} is missing")
    else:
        from safetensors import safe_open

        with safe_open(str(weights_path), framework="pt") as handle:
            extra = sorted(k for k in handle.keys() if not (".lora_A." in k or ".lora_B." in k))
        if extra:
            problems.append(f"{weights_path.name} holds non-LoRA tensors: {', '.join(extra[:3])}")
    return problems
