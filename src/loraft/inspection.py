"""`loraft inspect`: which modules an adapter's target pattern matches, by layer, and the parameter counts, from
the model's config built on the meta device (no weights read)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional, Union

from loraft import gguf_base
from loraft.config import AdapterConfig
from loraft.errors import ModelError
from loraft.model import first_line, meta_counts


def inspect_model(
    name_or_path: str,
    target_modules: Optional[Union[str, list[str]]] = None,
    modules_to_save: Optional[list[str]] = None,
    adapter: Optional[AdapterConfig] = None,
    trust_remote_code: bool = False,
) -> dict:
    """Build the model from its config on the meta device (no weights read) and report adapter targets.

    Returns:
        {"matched": [module names], "by_layer": {layer: [names]}, "trainable_params": N, "total_params": N,
         "tied_embeddings": note or None}
    """
    from transformers import AutoConfig

    adapter = (adapter or AdapterConfig()).model_copy()
    if target_modules is not None:
        adapter.target_modules = target_modules
    if modules_to_save is not None:
        adapter.modules_to_save = modules_to_save or None
    try:
        model_config = AutoConfig.from_pretrained(gguf_base.resolve(name_or_path), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"{name_or_path}: cannot read a model config ({first_line(exc)})") from None
    counts = meta_counts(model_config, adapter, trust_remote_code)
    info, trainable, total = counts["info"], counts["trainable_params"], counts["total_params"]
    by_layer: dict[str, list[str]] = defaultdict(list)
    for name in info["target_matches"]:
        layer = re.search(r"\.(\d+)\.", name)
        by_layer[layer.group(1) if layer else "-"].append(name)
    return {
        "model": str(name_or_path),
        "matched": info["target_matches"],
        "by_layer": dict(by_layer),
        "trainable_params": trainable,
        "total_params": total,
        "tied_embeddings": info["tied_embeddings"],
    }


def format_inspection(report: dict) -> str:
    """Human-readable `loraft inspect` output: matches grouped by layer, then parameter counts."""
    lines = [f"model: {report['model']}", f"matched {len(report['matched'])} modules:"]
    for layer, names in sorted(report["by_layer"].items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)):
        lines.append(f"  layer {layer}: " + ", ".join(names))
    share = 100.0 * report["trainable_params"] / max(report["total_params"], 1)
    lines.append(
        f"trainable params: {report['trainable_params']:,} || total params: {report['total_params']:,} "
        f"|| trainable: {share:.4f}%"
    )
    if report.get("tied_embeddings"):
        lines.append("note: " + report["tied_embeddings"]["message"])
    return "\n".join(lines)
