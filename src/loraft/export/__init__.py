"""Export a run: `merge` writes a standalone transformers model; `gguf` converts it for llama.cpp and Ollama
(with `ollama` writing the Modelfile) and proves with llama.cpp itself that the file computes what the run does."""

from loraft.export.merge import MERGE_DTYPES, MERGE_FILE, MERGEABLE_METHODS, merge_run, vllm_adapter_problems

__all__ = ["MERGE_DTYPES", "MERGE_FILE", "MERGEABLE_METHODS", "merge_run", "vllm_adapter_problems"]
