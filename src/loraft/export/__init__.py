"""Export a run: `merge` writes a standalone transformers model; `gguf` converts it for llama.cpp and Ollama
(with `ollama` writing the Modelfile) and proves with llama.cpp itself that the file computes what the run does.

The merge names are loaded on first use, so importing a light submodule (ollama, llamacpp) does not import torch.
"""

__all__ = ["MERGE_DTYPES", "MERGE_FILE", "MERGEABLE_METHODS", "merge_run", "vllm_adapter_problems"]


def __getattr__(name: str):
    if name in __all__:
        from loraft.export import merge

        return getattr(merge, name)
    raise AttributeError(f"module 'loraft.export' has no attribute {name!r}")
