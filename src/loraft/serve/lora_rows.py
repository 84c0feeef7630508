"""Each row of a batch through its own adapter (`MixedAdapters`, below): plain LoRA linear layers in two batched
matmuls per layer, whatever the number of adapters in the batch (the gathered matmul of punica and S-LoRA), instead
of peft's loop over them; every other adapter layer through peft's `adapter_names`.

peft's mixed batch (`adapter_names`) runs, in every LoRA layer, one gather, two matmuls, a scaling and a scatter
per adapter in the batch: at 4 adapters on SmolLM2-135M that made a batch of 8 decode at half the speed of a batch
of one adapter (docs/serving.md). Here a layer holds, for the adapters of the running batch, their A matrices
stacked [adapters + 1, in, r] and their B matrices stacked [adapters + 1, r, out] with each adapter's scaling folded
in (ranks padded with zeros, which add exactly nothing; slot 0 is all zeros: the base's rows, and adapters that
have no LoRA on this layer). A step gathers each row's slot and computes base(x) + (x A[slot]) B[slot].

Only plain peft `lora.Linear` layers take this path (no DoRA or other variant, no LoRA bias, unmerged, on a 3-D
input with one row per request); any other adapter layer keeps peft's own mixed path.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch

from loraft.serve.job import BASE_ADAPTER


def eligible(module) -> bool:
    """Whether a peft LoRA layer can take the stacked path."""
    from peft.tuners.lora.layer import Linear

    return (type(module) is Linear and not module.merged and not module.disable_adapters
            and not getattr(module, "lora_variant", None)
            and not any(layer.bias is not None for layer in module.lora_B.values()))


def stack(module, adapters: Sequence[str]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(A [len(adapters) + 1, in, r], B [len(adapters) + 1, r, out]) of one layer, slot i + 1 for adapters[i] with
    its scaling folded into B, slot 0 zeros; None when no adapter of the set has LoRA on this layer."""
    present = [name for name in adapters if name in module.lora_A]
    if not present:
        return None
    rank = max(module.r[name] for name in present)
    weight = module.lora_A[present[0]].weight
    a = torch.zeros(len(adapters) + 1, module.in_features, rank, dtype=weight.dtype, device=weight.device)
    b = torch.zeros(len(adapters) + 1, rank, module.out_features, dtype=weight.dtype, device=weight.device)
    for slot, name in enumerate(adapters, start=1):
        if name in module.lora_A:
            r = module.r[name]
            a[slot, :, :r] = module.lora_A[name].weight.t()
            b[slot, :r, :] = module.lora_B[name].weight.t() * module.scaling[name]
    return a, b


class StackedForward:
    """The forward a stacked layer runs while a batch decodes (set on the module instance, then removed)."""

    def __init__(self, module, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, names: list[str]):
        self.module, self.a, self.b, self.slots, self.names = module, a, b, slots, names

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.module
        if x.dim() != 3 or x.shape[0] != self.slots.shape[0]:  # not one row per request: peft's own path
            return type(module).forward(module, x, *args, adapter_names=self.names, **kwargs)
        result = module.base_layer(x, *args, **kwargs)
        a, b = self.a[self.slots], self.b[self.slots]  # [rows, in, r], [rows, r, out]
        delta = torch.bmm(torch.bmm(x.to(a.dtype), a), b)
        return result + delta.to(result.dtype)


class StackedLora:
    """The stacks of every eligible layer for the adapters of the running batch, built when that set changes."""

    def __init__(self):
        self.adapters: Optional[tuple[str, ...]] = None
        self.stacks: dict[int, Optional[tuple[torch.Tensor, torch.Tensor]]] = {}

    def forget(self) -> None:
        self.adapters, self.stacks = None, {}

    def forwards(self, modules: Sequence, names: Sequence[str]) -> dict:
        """{module: StackedForward} for the eligible layers, for a batch whose rows use `names`."""
        adapters = tuple(sorted({name for name in names if name != BASE_ADAPTER}))
        if adapters != self.adapters:  # a new set: stacks of this set only (memory: one copy of their LoRA weights)
            self.adapters, self.stacks = adapters, {}
            for module in modules:
                self.stacks[id(module)] = stack(module, adapters)
        slot = {name: index for index, name in enumerate(adapters, start=1)}
        slots = torch.tensor([slot.get(name, 0) for name in names], dtype=torch.long)
        forwards = {}
        for module in modules:
            stacked = self.stacks.get(id(module))
            if stacked is None:  # no adapter of the batch has LoRA here: the base layer alone
                forwards[module] = module.base_layer
            else:
                forwards[module] = StackedForward(module, *stacked, slots.to(stacked[0].device), list(names))
        return forwards


def _adapter_names_hook(module, args, kwargs, names):
    return args, {**kwargs, "adapter_names": names}


class MixedAdapters:
    """Each row of a batch through its own adapter.

    Plain LoRA linear layers take loraft.serve.lora_rows' stacked path: two gathered matmuls per layer whatever the
    number of adapters in the batch. Every other adapter layer gets peft's `adapter_names`, handed to it by a
    pre-forward hook as peft's own `adapter_names` argument does, with one difference: peft hands every layer the
    same names, and a module trained in full by some adapters and not by others (`modules_to_save`) fails on a row
    whose adapter has no copy of it (KeyError in ModulesToSaveWrapper, peft 0.21). Here such a row gets the base
    module there (`__base__`), which is what that adapter alone computes."""

    def __init__(self, model, stacked: bool = True):
        self.model, self.stacked = model, stacked
        self._modules: Optional[list] = None
        self._stacks = StackedLora()

    def forget(self) -> None:
        """Adapters were loaded or deleted: look the layers up again."""
        self._modules = None
        self._stacks.forget()

    def modules(self) -> list:
        """(module, kind) of every adapter layer: "stacked", "wrapper" (a module trained in full) or "layer"."""
        if self._modules is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            self._modules = []
            for module in self.model.modules():
                if isinstance(module, AuxiliaryTrainingWrapper):
                    self._modules.append((module, "wrapper"))
                elif isinstance(module, BaseTunerLayer):
                    self._modules.append((module, "stacked" if self.stacked and eligible(module) else "layer"))
        return self._modules

    @contextlib.contextmanager
    def rows(self, names: Sequence[str]):
        handles, patched = [], []
        try:
            stacked = [module for module, kind in self.modules() if kind == "stacked"]
            for module, forward in self._stacks.forwards(stacked, names).items():
                module.forward = forward
                patched.append(module)
            for module, kind in self.modules():
                if kind == "stacked":
                    continue
                per_row = ([name if name in module._adapters else BASE_ADAPTER for name in names]
                           if kind == "wrapper" else names)
                handles.append(module.register_forward_pre_hook(
                    functools.partial(_adapter_names_hook, names=list(per_row)), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                del module.forward
