"""Next-token choice: greedy, temperature, top-k and top-p (nucleus), seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l4compile.runtime import options


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: no limit
    top_p: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", options.temperature(self.temperature))
        object.__setattr__(self, "top_k", options.top_k(self.top_k))
        object.__setattr__(self, "top_p", options.top_p(self.top_p))

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """logits [batch, vocab] -> token ids [batch]."""
        if self.temperature == 0:
            return logits.argmax(axis=-1)
        scaled = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < scaled.shape[-1]:
            kth = np.partition(scaled, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1:
            kept = np.zeros_like(probs)
            for row, out in zip(probs, kept):
                nucleus = _nucleus(row, self.top_p)
                out[nucleus] = row[nucleus]
            probs = kept / kept.sum(axis=-1, keepdims=True)
        draws = rng.random((probs.shape[0], 1))
        return np.minimum((np.cumsum(probs, axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)


# Candidates a nucleus is first looked for among (the most probable tokens); a wider nucleus sorts the vocabulary.
NUCLEUS_CANDIDATES = 1024


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most probable tokens whose probability reaches top_p: in the order of
    a stable sort by descending probability, every token whose predecessors sum to less than top_p (at least
    one). Sorting the whole vocabulary (202k tokens for Llama 4) costs milliseconds a token; the nucleus is
    nearly always among the most probable few, so they are sorted first: the tokens above the smallest
    candidate's probability are exactly the first ones of the full stable order (ties at that probability
    are left out), their running sums are the full order's, and the nucleus is theirs when it ends among them."""
    order = None
    if probs.shape[-1] > NUCLEUS_CANDIDATES:
        floor = probs[np.argpartition(probs, -NUCLEUS_CANDIDATES)[-NUCLEUS_CANDIDATES:]].min()
        head = np.flatnonzero(probs > floor)
        head = head[np.argsort(-probs[head], kind="stable")]
        if np.count_nonzero(np.cumsum(probs[head]) - probs[head] < top_p) < len(head):
            order = head
    if order is None:
        order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    return order[np.cumsum(sorted_probs) - sorted_probs < top_p]
