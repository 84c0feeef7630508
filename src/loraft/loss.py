"""Causal-LM loss computed only where a label is supervised, in chunks, with lm_head fused into it.

The standard path runs lm_head over every position (prompt and padding included) and keeps full-vocabulary
float32 logits, their softmax and gradient alive until backward: for a micro-batch of 8 x 256 tokens and a
46k vocabulary that is ~380 MB per copy. Here the hidden states of the supervised positions are gathered
first, and lm_head + cross-entropy run over them a chunk at a time; each chunk's gradient with respect to
the hidden states (and to lm_head's weight, if it is trained) is computed right away, so only one chunk of
logits ever exists. The result equals `model(..., labels=...).loss` (tests/test_loss.py).
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MB in float32)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy(hidden @ weight.T, targets), gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_rows):
        needs_hidden_grad = ctx.needs_input_grad[0]
        needs_weight_grad = ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        weight_c = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            hidden_chunk = hidden[start : start + chunk_rows].to(compute_dtype)
            target_chunk = targets[start : start + chunk_rows]
            # the same rounding as the standard path: logits in the compute dtype, then float32 for the loss
            logits = (hidden_chunk @ weight_c.T).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, target_chunk[:, None]).squeeze(1)).sum()
            if needs_hidden_grad or needs_weight_grad:
                grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
                grad_logits[torch.arange(target_chunk.shape[0], device=hidden.device), target_chunk] -= 1.0
                grad_logits = grad_logits.to(compute_dtype)
                if needs_hidden_grad:
                    grad_hidden[start : start + chunk_rows] = grad_logits @ weight_c
                if needs_weight_grad:
                    grad_weight += (grad_logits.T @ hidden_chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def supervised_cross_entropy(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    num_items_in_batch: Optional[torch.Tensor | int] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Next-token cross-entropy of `hidden_states @ weight.T` against `labels` shifted by one.

    Args:
        hidden_states: [batch, length, hidden], the model body's last hidden states.
        labels: [batch, length], IGNORE_INDEX where nothing is supervised.
        weight: lm_head's weight [vocab, hidden].
        num_items_in_batch: divide the summed loss by this (Trainer's count over all accumulated micro-batches);
            None divides by this batch's supervised tokens.
        compute_dtype: dtype of the lm_head matmul; None = the autocast dtype when autocast is on, else weight's.
    Returns:
        the scalar loss (float32).
    """
    if compute_dtype is None:
        device_type = hidden_states.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        )
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][supervised]
    targets = targets[supervised]
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if targets.numel() == 0:
        return hidden_states.sum() * 0.0
    chunk_rows = max(16, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(hidden_states.device.type, enabled=False):
        total = _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, chunk_rows)
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count
