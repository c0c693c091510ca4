"""The load-balancing loss: 1 for a perfectly balanced router, larger when collapsed, and a per-sequence sum
(so any split of a batch over ranks or micro-batches adds up to the whole batch's)."""

from __future__ import annotations

import torch

from l4compile.train.loss import load_balancing_sum


def test_balanced_collapsed_and_split_invariant():
    experts, seq = 4, 8
    balanced = torch.eye(experts).repeat(seq // experts, 1) * 5.0             # each expert chosen equally
    value = load_balancing_sum([balanced], top_k=1, batch=1)
    probs = torch.softmax(balanced, -1).mean(0)
    assert torch.isclose(value, experts * (probs / experts).sum())
    collapsed = torch.zeros(seq, experts)
    collapsed[:, 0] = 5.0
    assert load_balancing_sum([collapsed], 1, 1) > 2 * value
    logits = torch.randn(6 * seq, experts, requires_grad=True)
    whole = load_balancing_sum([logits], 2, 6)
    parts = load_balancing_sum([logits[:2 * seq]], 2, 2) + load_balancing_sum([logits[2 * seq:]], 2, 4)
    assert torch.isclose(whole, parts)
    whole.backward()
    assert logits.grad.abs().sum() > 0  # the router learns from it
