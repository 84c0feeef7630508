"""LoRA dropout on the CPU at a third of nn.Dropout's cost, with the same distribution.

peft puts an `nn.Dropout` in front of every LoRA A matrix. On a CPU its mask is one draw of torch's serial random
generator per element, and on SmolLM2 that was a third of a whole training step (docs/benchmarks.md, "Where a step
goes"). `LoraDropout` draws 64-bit words from the same generator and reads each as four 16-bit uniform words:
an element is dropped when its word is among the lowest round(p * 65536) of the 65,536 values. So:
- each element is dropped independently with probability p' = round(p * 65536) / 65536 (|p' - p| <= 2^-17);
- kept elements are scaled by 1 / (1 - p'), so the expected output equals the input, as nn.Dropout's;
- the draws come from torch's default generator, so `torch.manual_seed` and the generator state a checkpoint
  saves reproduce the masks exactly (a resumed run stays bit-equal);
- the module is an nn.Dropout (p, train/eval, `disable_dropout` helpers that set p = 0 behave as before), and off
  the CPU it is nn.Dropout itself (CUDA's generator is already parallel).
The masks differ from nn.Dropout's element for element (another stream of the same distribution): a run with
adapter dropout is reproducible against itself, not against a run with peft's own module.
"""

from __future__ import annotations

import torch
from torch import nn

WORDS = 65536  # 16-bit words: the resolution of the drop probability


def drop_threshold(p: float) -> int:
    """How many of the 65,536 word values drop an element at probability `p`."""
    return min(WORDS - 1, max(0, round(p * WORDS)))


def drop_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool tensor of `shape`, True where an element is dropped, each independently with probability
    drop_threshold(p) / 65536, from torch's default CPU generator."""
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # the full 64 bits
    return words.view(torch.int16)[:count].view(shape) < drop_threshold(p) - WORDS // 2


class _MaskedScale(torch.autograd.Function):
    """x with dropped elements zeroed and the rest scaled; the backward applies the same mask and scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None, None


class LoraDropout(nn.Dropout):
    """nn.Dropout with the CPU mask of this module's docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        threshold = drop_threshold(self.p)
        if threshold == 0:
            return x
        return _MaskedScale.apply(x, drop_mask(x.shape, self.p), WORDS / (WORDS - threshold))


def use_fast_dropout(model: nn.Module) -> int:
    """Replace the nn.Dropout modules in `model`'s LoRA layers (peft's `lora_dropout` dicts) with LoraDropout of
    the same p; returns how many were replaced. Other dropouts (the model's own) are left alone."""
    replaced = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, nn.ModuleDict):
            continue
        for name, dropout in list(table.items()):
            if type(dropout) is nn.Dropout:
                fast = LoraDropout(dropout.p)
                fast.train(dropout.training)
                table[name] = fast
                replaced += 1
    return replaced
