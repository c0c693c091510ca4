"""A KV cache that exploits chunked attention.

Chunked (RoPE) layers attend only within their chunk, so each keeps one
buffer of `chunk` positions that restarts at every chunk boundary; global
(NoPE) layers keep the whole history. Buffers are preallocated once and
sequence-major ([positions, batch, kv_heads, head_dim]), so the cached prefix
handed to the model is a contiguous view, never a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l4compile.runtime.manifest import Manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class LayerCache:
    index: int
    chunk: int | None          # chunk size of a chunked layer; None for a global layer
    keys: np.ndarray           # [capacity, batch, kv_heads, head_dim]
    values: np.ndarray

    def cached(self, length: int) -> int:
        """How many positions the model must see before absolute position `length`."""
        return length % self.chunk if self.chunk else length

    def window(self, length: int, new: int) -> tuple[int, int]:
        """After writing positions [length, length+new): (first position kept, its slot)."""
        end = length + new
        start = (end - 1) // self.chunk * self.chunk if self.chunk else 0
        return start, max(start, length)


class KVCache:
    """Preallocated per-layer buffers for `batch` sequences of at most `max_length` tokens."""

    def __init__(self, manifest: Manifest, batch: int, max_length: int) -> None:
        dtype = NUMPY_DTYPES[manifest.dtype]
        self.length = 0
        self.max_length = max_length
        self.layers = []
        for layer in manifest.layers:
            capacity = min(layer.kv_capacity, max_length) if layer.kv_capacity else max_length
            shape = (capacity, batch, layer.num_kv_heads, layer.head_dim)
            self.layers.append(LayerCache(layer.index, layer.kv_capacity, np.zeros(shape, dtype),
                                          np.zeros(shape, dtype)))

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def views(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each layer's cached keys and values, as contiguous views of the buffers."""
        return [(layer.keys[:layer.cached(self.length)], layer.values[:layer.cached(self.length)])
                for layer in self.layers]

    def output_slots(self, new: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Where each layer's new keys and values can be written directly, or None when they must be copied.

        A step whose new positions all land in the buffer (global layers, or a chunked layer that does
        not cross a chunk boundary in this step) gets views the model writes into; no copy follows.
        """
        slots = []
        for layer in self.layers:
            start, first = layer.window(self.length, new)
            if first == self.length:  # every new position is kept, from slot length - start on
                a = self.length - start
                slots.append((layer.keys[a:a + new], layer.values[a:a + new]))
            else:
                slots.append(None)
        return slots

    def commit(self, new: int, copies: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Advance by `new` positions; `copies` holds the new keys/values of layers that had no direct slot."""
        for i, (keys, values) in copies.items():
            layer = self.layers[i]
            start, first = layer.window(self.length, new)
            kept = slice(first - self.length, new)
            layer.keys[first - start:self.length + new - start] = keys[kept]
            layer.values[first - start:self.length + new - start] = values[kept]
        self.length += new
