"""Rotary frequencies, with llama3-style scaling, as transformers computes them (float32)."""

from __future__ import annotations

import math

import numpy as np

from l4compile.spec.model import RopeSpec


def inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """theta^(-2j/head_dim) for j < head_dim/2, float32, llama3-scaled when configured."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    freqs = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    scaling = rope.scaling
    if scaling is None:
        return freqs
    factor = np.float32(scaling.factor)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = (np.float32(2 * math.pi) / freqs).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, freqs / factor, freqs).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # low == high factor: no medium band
        smooth = ((old_len / wavelen - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
