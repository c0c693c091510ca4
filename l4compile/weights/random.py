"""Deterministic random weights for any spec: each tensor drawn from its own seed."""

from __future__ import annotations

import zlib

import numpy as np

from l4compile.ir.graph import Value
from l4compile.weights.base import WeightSource, numpy_dtype


class RandomWeights(WeightSource):
    """Tensor `name` is drawn from rng(seed, crc32(name)): independent of order and of other tensors.

    Scales keep activations O(1) so that parity tests compare meaningful numbers:
    linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ 1 + N(0, 0.1).
    """

    def __init__(self, seed: int = 0) -> None:
        from l4compile.runtime import options
        self.seed = options.integer("seed", seed, 0, options.SEED_MAX)
        self.description = f"random (seed {seed})"

    def get(self, param: Value) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(param.name.encode())])
        shape = param.type.shape
        data = rng.standard_normal(shape, dtype=np.float32)
        if param.init == "norm":
            data = 1.0 + 0.1 * data
        elif param.init != "embedding":
            fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
            data *= np.float32(1.0 / np.sqrt(fan_in))
        return data.astype(numpy_dtype(param.type.dtype), copy=False)
