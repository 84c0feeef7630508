"""How the base model's frozen weights are stored: in the compute dtype, or quantized (QLoRA).

Casting: under bf16/fp16 the frozen linear weights are stored in the compute dtype, each one cast in place with
the memory-mapped checkpoint pages it was read from released (peak RSS in docs/benchmarks.md).

QLoRA: the base's linear layers stored by bitsandbytes in 4-bit NF4 or 8 bits while the adapter trains.
transformers owns the quantized loading (`BitsAndBytesConfig`), peft the preparation for training
(`prepare_model_for_kbit_training`: frozen base, norms in fp32, inputs that carry gradients for checkpointing).
loraft picks the settings from the run: NF4 with double quantization (the QLoRA paper's), the compute dtype of
the run's precision. lm_head and the embeddings are not quantized (transformers keeps the output embedding in
full precision), so the fused supervised loss and `modules_to_save: [embeddings]` work as without quantization.
bitsandbytes >= 0.45 runs both on CPU as well as CUDA (int8 casts its inputs to fp16 there, so it is slow).

A QLoRA run's adapter is standard peft: it loads on the unquantized base as well. chat / generate / eval / serve
load the base quantized again, as it was trained; `loraft merge` merges into the unquantized base (merging into
4-bit weights would round the update away), so the merged model differs from the adapter on the quantized base
by the quantization error (tests/test_qlora.py bounds it).
"""

from __future__ import annotations

from typing import Optional

import torch

from loraft.errors import MissingExtraError

QUANTIZED = ("nf4", "int8")


def require_bitsandbytes(setting: str) -> None:
    """Stop before loading anything when the qlora extra is missing (one sentence naming the extra)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingExtraError(f"model.quantization={setting} needs the 'qlora' extra (bitsandbytes not installed): "
                                "run pip install 'loraft[qlora]'")


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> Optional[object]:
    """transformers' BitsAndBytesConfig for `model.quantization` (None for none)."""
    if quantization == "none":
        return None
    require_bitsandbytes(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """peft's preparation of a quantized base for adapter training (a no-op for an unquantized one)."""
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to `dtype` in place (tied ones once), except the modules the model keeps in
    fp32 (`_keep_in_fp32_modules`), as from_pretrained(dtype=...) does; buffers keep their dtype."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    releaser = _PageReleaser(model)
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point() or parameter.dtype == dtype:
            continue
        if any(part in keep for part in name.split(".")):
            continue
        releaser.cast(parameter, dtype)


def cast_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights of every linear layer in `dtype`; returns how many parameters were cast.

    Under bf16 autocast each linear layer casts its fp32 weight to bf16 on every call; storing the frozen ones
    in bf16 computes the same values without that copy and halves their memory. Trainable parameters (LoRA,
    modules_to_save), norms and an input embedding that is still looked up (tied to lm_head) stay fp32.
    """
    releaser, chosen = _PageReleaser(model), frozen_linear_weights(model, dtype)
    for parameter in chosen:
        releaser.cast(parameter, dtype)
    return len(chosen)


def frozen_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> list:
    """What cast_frozen_weights casts: the frozen weights and biases of every linear layer not yet in `dtype`, less
    an input embedding that is still looked up (tied to lm_head)."""
    input_weight = getattr(model.get_input_embeddings(), "weight", None)
    chosen = {id(parameter): parameter for module in model.modules() if isinstance(module, torch.nn.Linear)
              for parameter in (module.weight, module.bias)
              if parameter is not None and not parameter.requires_grad and parameter is not input_weight
              and parameter.dtype != dtype}  # a weight two layers share, once
    return list(chosen.values())


class _PageReleaser:
    """Casts parameters in place and drops from this process the pages of memory-mapped checkpoint tensors that a
    cast replaced.

    from_pretrained maps the safetensors file; reading a weight to cast it makes its pages resident, and they
    stay counted in RSS while the mapping lives (other tensors still use it): casting the 1.3B BLOOM this way
    peaked at 8.0 GiB RSS, more than the fp32 reference holds. MADV_DONTNEED on the pages of a file mapping
    only unmaps them (they are re-read from the file if touched). Only whole pages inside a replaced tensor
    that no live parameter or buffer shares are released; Linux only. Who shares a storage and where the files
    are mapped are read once per model, not once per cast (SmolLM2's cast, median 0.30 s before, 0.11 s; Zen 4,
    benchmarks/cast_weights.py).
    """

    def __init__(self, model: torch.nn.Module):
        import sys
        from collections import Counter

        self.users: Counter = Counter()
        self.mapped: list[tuple[int, int]] = []
        if not sys.platform.startswith("linux"):
            return
        # a tied weight is one Parameter, listed once; distinct tensors on one storage count once each
        for tensor in list(model.parameters()) + list(model.buffers()):
            self.users[tensor.untyped_storage().data_ptr()] += 1
        try:
            with open("/proc/self/maps", encoding="utf-8") as maps:
                for fields in (line.split() for line in maps):
                    if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                        low, high = fields[0].split("-")
                        self.mapped.append((int(low, 16), int(high, 16)))
        except OSError:
            self.mapped = []

    def cast(self, parameter: torch.nn.Parameter, dtype: torch.dtype) -> None:
        """Store `parameter` in `dtype` in place and release the mapped pages it was read from."""
        original = parameter.data.untyped_storage()
        parameter.data = parameter.data.to(dtype)
        start, size = original.data_ptr(), original.nbytes()
        self.users[start] -= 1
        if self.users[start] > 0 or not any(low <= start and start + size <= high for low, high in self.mapped):
            return
        import ctypes
        import mmap

        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            try:
                ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
            except (OSError, AttributeError):
                return


def detach_from_checkpoint(model: torch.nn.Module) -> int:
    """Copy the parameters and buffers still backed by the memory-mapped checkpoint into memory, so the mapping
    (and every page of it read while loading) is released; returns how many were copied. After a quantized load
    only the unquantized rest (embeddings, norms, lm_head) still maps the file, which keeps all the pages the
    quantization read resident: 5 GiB of the fp32 bloom-1b4-zh checkpoint (docs/benchmarks.md, QLoRA memory)."""
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            ranges = [tuple(int(bound, 16) for bound in fields[0].split("-"))
                      for fields in (line.split() for line in maps)
                      if len(fields) >= 6 and fields[5].endswith(".safetensors")]
    except OSError:
        return 0
    copied = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        start = tensor.untyped_storage().data_ptr()
        if any(low <= start < high for low, high in ranges):
            tensor.data = tensor.data.clone()
            copied += 1
    return copied


class HeadCastOnce:
    """Within the block, an fp32 output head that stays fp32 because it is tied to the input embedding computes
    from one copy of its weight in the autocast dtype, made on entry, instead of the copy autocast makes at every
    call: a `generate` call runs the head once per new token (SmolLM2's 28M-parameter head: 22 ms a cast, about as
    long as a decoding step's matmuls). Exactly autocast's values: the same cast of weight and input, the same
    matmul. Nothing changes when autocast is off, the head is trainable, or it is already in that dtype.
    """

    def __init__(self, model: torch.nn.Module):
        self.head = model.get_output_embeddings()

    def __enter__(self) -> "HeadCastOnce":
        head, device = self.head, None
        weight = getattr(head, "weight", None)
        if isinstance(head, torch.nn.Linear) and weight is not None:
            device = weight.device.type
        if device is None or not torch.is_autocast_enabled(device) or weight.requires_grad:
            self.head = None
            return self
        dtype = torch.get_autocast_dtype(device)
        if weight.dtype == dtype:
            self.head = None
            return self
        cast_weight = weight.detach().to(dtype)
        cast_bias = None if head.bias is None else head.bias.detach().to(dtype)

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(hidden.to(dtype), cast_weight, cast_bias)

        head.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
        return self

    def __exit__(self, *exc) -> None:
        if self.head is not None:
            del self.head.forward
