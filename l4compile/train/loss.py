"""The training objective: causal LM cross-entropy plus an optional router load-balancing loss.

Cross-entropy is over shifted labels (position t predicts token t+1; label IGNORE_INDEX is skipped), and
returned as a *sum* over tokens: the train loop divides by the number of labelled tokens in the whole
global batch (all micro-batches, all ranks), so the gradient does not depend on how the batch is split.

Load balancing: transformers' Llama 4 returns router logits but adds no auxiliary loss (its
`Llama4ForCausalLM` has no `router_aux_loss_coef` term), so its loss is the cross-entropy alone. We add,
when asked, the Switch-Transformer loss `E * sum_e f_e * P_e` (f_e: fraction of the routed token copies
that chose expert e, P_e: mean softmax router probability of e), times the spec's
`router_aux_loss_coef`, averaged over MoE layers. It is computed per sequence and averaged over
sequences, so it too is independent of the split across ranks and micro-batches (a batch-level f_e*P_e
is not: it is a product of means).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over labelled positions of -log p(label[t+1] | ids[:t+1]). logits [B, S, V], labels [B, S]."""
    shifted = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many positions contribute to the loss (the shifted labels that are not IGNORE_INDEX)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def load_balancing_sum(router_logits: list[torch.Tensor], top_k: int, batch: int) -> torch.Tensor:
    """Sum over the `batch` sequences of the per-sequence balance loss, averaged over MoE layers.
    Each router logits tensor is [batch * S, E]; a perfectly balanced router scores 1 per sequence."""
    if not router_logits:
        return torch.zeros(())
    total = 0.0
    for logits in router_logits:
        experts = logits.shape[-1]
        logits = logits.view(batch, -1, experts)
        probs = torch.softmax(logits.float(), dim=-1)                       # [B, S, E]
        chosen = torch.topk(logits, top_k, dim=-1).indices                  # [B, S, k]
        counts = F.one_hot(chosen, experts).sum(dim=2).float()              # [B, S, E]
        fraction = counts.mean(dim=1) / top_k                               # [B, E]
        total = total + experts * (fraction * probs.mean(dim=1)).sum()      # summed over sequences
    return total / len(router_logits)
