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
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            outside = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= self.top_p  # keeps at least one
            sorted_probs[outside] = 0
            probs = np.zeros_like(probs)
            np.put_along_axis(probs, order, sorted_probs, axis=-1)
            probs /= probs.sum(axis=-1, keepdims=True)
        draws = rng.random((probs.shape[0], 1))
        return np.minimum((np.cumsum(probs, axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)
