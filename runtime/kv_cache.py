"""A KV cache that exploits chunked attention.

Chunked (RoPE) layers attend only within their chunk, so each keeps one
buffer of `chunk` positions that restarts at every chunk boundary; global
(NoPE) layers keep the whole history. Buffers are preallocated once, in the
layout the build's manifest names (`kv_cache.layout`):

- in place (onnx-cpu builds, `kv_cache.in_place`): batch-major [batch, kv_heads,
  capacity, head_dim]; the model reads each row's cached positions where they lie
  and writes the new ones after them, in the same buffer. Every row has its own
  position (`lengths`), so rows of a batch may stand at different positions and a
  row's slice of the buffers is itself a cache (`row`). A step's new tokens must
  stay in one chunk of the chunked layers: `pieces` splits longer steps.
- sequence-major (trt builds): [positions, batch, kv_heads, head_dim], one
  position for the batch; the cached prefix handed to the model is a contiguous
  view, and new keys/values come back to be written into their slots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from l4compile.runtime.errors import RuntimeInputError
from l4compile.runtime.manifest import Manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
# A prefill piece's attention scores (onnxruntime's GroupQueryAttention holds [batch, heads, piece,
# capacity] float32 per layer) stay under this many bytes: long prompts of global layers run in pieces.
PIECE_SCORE_BYTES = 256 << 20


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass
class LayerCache:
    index: int
    chunk: int | None          # chunk size of a chunked layer; None for a global layer
    keys: np.ndarray           # [capacity, batch, kv_heads, head_dim], or in place [batch, kv_heads, capacity, head_dim]
    values: np.ndarray
    in_place: bool = False

    @property
    def capacity(self) -> int:
        return self.keys.shape[2 if self.in_place else 0]

    def cached(self, length: int) -> int:
        """How many positions the model must see before absolute position `length`."""
        return length % self.chunk if self.chunk else length

    def window(self, length: int, new: int) -> tuple[int, int]:
        """After writing positions [length, length+new): (first position kept, its slot)."""
        end = length + new
        start = (end - 1) // self.chunk * self.chunk if self.chunk else 0
        return start, max(start, length)


class KVCache:
    """Preallocated per-layer buffers for `batch` sequences of at most `max_length` tokens.

    Raises RuntimeInputError, before allocating anything, when the buffers and the scores of a prefill
    piece would not fit in the memory this machine has available.
    """

    def __init__(self, manifest: Manifest, batch: int, max_length: int) -> None:
        dtype = NUMPY_DTYPES[manifest.dtype]
        self.in_place = bool((manifest.kv_cache or {}).get("in_place"))
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.max_length = max_length
        self.heads = max((layer.num_heads or layer.num_kv_heads) for layer in manifest.layers) if manifest.layers else 1
        shapes = []
        for layer in manifest.layers:
            capacity = min(layer.kv_capacity, max_length) if layer.kv_capacity else max_length
            shapes.append((capacity, batch, layer.num_kv_heads, layer.head_dim) if not self.in_place else
                          (batch, layer.num_kv_heads, capacity, layer.head_dim))
        self._check_memory(shapes, np.dtype(dtype).itemsize, batch, max_length)
        self.layers = [LayerCache(layer.index, layer.kv_capacity, np.zeros(shape, dtype), np.zeros(shape, dtype),
                                  self.in_place) for layer, shape in zip(manifest.layers, shapes)]

    def _check_memory(self, shapes: list[tuple[int, ...]], itemsize: int, batch: int, max_length: int) -> None:
        needed = 2 * itemsize * sum(int(np.prod(shape)) for shape in shapes)
        needed += min(PIECE_SCORE_BYTES, 4 * batch * self.heads * max_length * max_length)
        available = available_memory()
        if available is not None and needed > available:
            raise RuntimeInputError(f"a context of {max_length} tokens x batch {batch} needs {_gb(needed)} for its KV "
                                    f"cache and attention scores, but only {_gb(available)} of memory is available")

    @classmethod
    def _view(cls, parent: "KVCache", rows: slice) -> "KVCache":
        view = cls.__new__(cls)
        view.in_place, view.max_length, view.heads = True, parent.max_length, parent.heads
        view.lengths = parent.lengths[rows]
        view.layers = [LayerCache(layer.index, layer.chunk, layer.keys[rows], layer.values[rows], True)
                       for layer in parent.layers]
        return view

    def row(self, b: int) -> "KVCache":
        """Row b of an in-place cache as a cache of batch 1 sharing its memory (prefill one row alone)."""
        return self.rows(b, b + 1)

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) of an in-place cache as a cache sharing its memory (step part of a batch)."""
        if not self.in_place:
            raise RuntimeInputError("this build's KV cache keeps one position for the whole batch "
                                    "(sequence-major layout): rows cannot be stepped alone")
        return KVCache._view(self, slice(start, stop))

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The position of the batch (the longest row's, where rows differ)."""
        return int(self.lengths.max()) if len(self.lengths) else 0

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[:] = value

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    # ---- in place ----------------------------------------------------------
    def pieces(self, new: int) -> list[int]:
        """Sizes of the runs a step of `new` tokens takes on an in-place cache: none crosses a chunk
        boundary of a chunked layer, and a piece's attention scores stay under PIECE_SCORE_BYTES."""
        if new > 1 and self.batch > 1:
            raise RuntimeInputError("a step of several tokens runs one row at a time (KVCache.row)")
        if self.length + new > self.max_length:
            raise RuntimeInputError(f"{new} new tokens after {self.length} exceed this cache's {self.max_length} "
                                    "positions")
        chunks = [layer.chunk for layer in self.layers if layer.chunk]
        chunk = min(chunks) if chunks else None
        capacity = max((layer.capacity for layer in self.layers), default=1)
        budget = max(1, PIECE_SCORE_BYTES // (4 * self.batch * self.heads * capacity))
        sizes, position, end = [], self.length, self.length + new
        while position < end:
            stop = min(end, position + budget)
            if chunk:
                stop = min(stop, (position // chunk + 1) * chunk)
            sizes.append(stop - position)
            position = stop
        return sizes

    # ---- sequence-major ----------------------------------------------------
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
        self.lengths += new
