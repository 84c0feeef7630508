"""BLOOM's fast paths: attention through `scaled_dot_product_attention` with alibi, and a one-kernel GELU.

These are the only library patches loraft makes; `use_fast_bloom` applies both to one model instance (each
module's `forward` is replaced, nothing global), `model.attn_implementation=eager` keeps the library's code.
tests/test_fastpaths_bloom.py checks that outputs and gradients equal the library's and that the replaced
forwards still have the signatures implemented here. Measured gains: docs/benchmarks.md.

Attention: transformers 5 runs BLOOM with eager attention only: it materialises the scores, a float32
softmax and its bfloat16 copy per layer and keeps them for backward. SDPA computes the same
softmax(q k^T / sqrt(d) + alibi + mask) v with a fused kernel that keeps none of them. Two details:

- alibi is applied relative to each query (slope * (key - query) instead of slope * key). Softmax is invariant
  to a per-row shift, so this is the same function; in bfloat16 it keeps the bias exact near the diagonal,
  where the eager path rounds slope * position (up to ~180) to a step of 1.
- the bias is built once per forward and shared by all layers (every layer gets the same alibi and mask).

GELU: BloomGelu is a Python autograd Function of ~7 elementwise ops forward and ~12 backward, each a full pass
over the [tokens, 4 x hidden] activation. Its formula is the tanh approximation,
x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x^2))), which `F.gelu(approximate="tanh")` computes in
one kernel each way (the constant is sqrt(2/pi) to 8 digits).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# The BloomAttention.forward parameters the SDPA replacement implements (checked by a test).
BLOOM_ATTENTION_PARAMETERS = (
    "self", "hidden_states", "residual", "alibi", "attention_mask", "layer_past", "use_cache",
    "output_attentions", "kwargs",
)


class _SharedBias:
    """The attention bias of the current forward pass, computed by the first layer, reused by the others.

    Holding the alibi and mask tensors keeps them alive, so an identity check cannot match a new tensor
    that happens to reuse a freed one's address.
    """

    def __init__(self):
        self.key = None
        self.bias = None
        # [batch, length] sample ids of a packed batch (loraft.packing), set for its forward and backward by
        # `packed_segments`; None otherwise
        self.segments = None

    def get(self, alibi, attention_mask, batch_size, num_heads, q_length, dtype):
        key = (alibi, attention_mask, q_length, dtype, self.segments)
        if self.key is not None and all(a is b for a, b in zip(self.key, key)):
            return self.bias
        self.key = key
        self.bias = _alibi_bias(alibi, attention_mask, batch_size, num_heads, q_length, dtype, self.segments)
        return self.bias


def _alibi_bias(alibi, attention_mask, batch_size, num_heads, q_length, dtype, segments=None):
    """[batch, heads, q, k] additive bias: relative alibi plus the (causal and padding) mask, and for a packed
    batch the mask between different samples' tokens (alibi is relative: a sample sees the biases it has alone)."""
    kv_length = alibi.shape[-1]
    positions = alibi.float().view(batch_size, num_heads, 1, kv_length)  # slope * key position
    query_positions = positions[..., kv_length - q_length :].transpose(-1, -2)
    bias = positions - query_positions
    if attention_mask is None:
        causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=alibi.device).tril(kv_length - q_length)
        bias = bias.masked_fill(~causal, torch.finfo(torch.float32).min)
    elif attention_mask.dtype == torch.bool:
        bias = bias.masked_fill(~attention_mask, torch.finfo(torch.float32).min)
    else:
        bias = bias + attention_mask.float()
    if segments is not None and q_length == kv_length:
        same_sample = segments[:, None, :, None] == segments[:, None, None, :]
        bias = bias.masked_fill(~same_sample, torch.finfo(torch.float32).min)
    # keep masked entries finite in the compute dtype: a fully masked row (left padding) then gives a
    # uniform softmax like the eager path instead of NaN
    return bias.clamp(min=torch.finfo(dtype).min).to(dtype)


def _bloom_sdpa_forward(
    self,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs,
):
    if output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                  use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch_size, q_length, _ = hidden_states.shape
    fused_qkv = self.query_key_value(hidden_states)
    query, key, value = self._reshape(fused_qkv)  # each [batch, heads, length, head_dim]
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    bias = self._loraft_bias.get(alibi, attention_mask, batch_size, self.num_heads, q_length, query.dtype)
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, scale=self.inv_norm_factor,
        dropout_p=self.attention_dropout.p if self.training else 0.0,
    )
    context = context.transpose(1, 2).reshape(batch_size, q_length, self.hidden_size)
    output = self.dense(context)
    output = residual + F.dropout(output, p=self.hidden_dropout, training=self.training)
    return output, None


def _tanh_gelu(self, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def use_fast_bloom(model: torch.nn.Module) -> int:
    """Route every BloomAttention of `model` through SDPA and every BloomGelu through F.gelu; returns how many
    attention modules now use SDPA (0 for a model that is not BLOOM)."""
    from transformers.models.bloom.modeling_bloom import BloomAttention, BloomGelu

    shared = _SharedBias()
    count = 0
    for module in model.modules():
        if isinstance(module, BloomAttention):
            module._loraft_bias = shared
            module.forward = types.MethodType(_bloom_sdpa_forward, module)
            count += 1
        elif isinstance(module, BloomGelu):
            module.forward = types.MethodType(_tanh_gelu, module)
    return count


def uses_fast_bloom(model: torch.nn.Module) -> bool:
    return any(hasattr(module, "_loraft_bias") for module in model.modules())


def shared_bias(model: torch.nn.Module):
    """The one _SharedBias of a model whose attention use_fast_bloom patched (None when unpatched)."""
    return next((module._loraft_bias for module in model.modules() if hasattr(module, "_loraft_bias")), None)
