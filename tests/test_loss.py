"""loraft.loss: the supervised-only cross-entropy equals the model's own loss and gradients, chunked or not."""

import copy

import pytest
import torch
from test_fastpaths_bloom import _batch, _bloom

from loraft.loss import supervised_cross_entropy


@pytest.mark.parametrize("count", [None, 37])
def test_supervised_loss_equals_standard_loss(count):
    model = _bloom().train()
    fast = copy.deepcopy(model)
    input_ids, mask, labels = _batch()
    kwargs = {"num_items_in_batch": torch.tensor(count)} if count else {}
    expected = model(input_ids=input_ids, attention_mask=mask, labels=labels, **kwargs).loss
    expected.backward()
    hidden = fast.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state
    actual = supervised_cross_entropy(hidden, labels, fast.lm_head.weight, count)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_supervised_loss_chunks_and_trainable_head(monkeypatch):
    """Many small chunks, and a head whose weight is trained, give the same loss and gradients."""
    import loraft.loss

    monkeypatch.setattr(loraft.loss, "CHUNK_ELEMENTS", 120 * 3)  # 3 rows per chunk
    hidden = torch.randn(3, 14, 64, requires_grad=True)
    weight = torch.randn(120, 64, requires_grad=True)
    _, _, labels = _batch()
    logits = hidden @ weight.T
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 120), labels[:, 1:].reshape(-1))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    actual = supervised_cross_entropy(hidden, labels, weight)
    actual_grads = torch.autograd.grad(actual, (hidden, weight))
    torch.testing.assert_close(actual, expected)
    for a, b in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_supervised_loss_without_supervised_tokens_is_zero_and_differentiable():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    loss = supervised_cross_entropy(hidden, torch.full((2, 5), -100), torch.randn(10, 8))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None
