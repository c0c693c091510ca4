"""Parameters computed from other parameters (quantized codes and scales), inside the weight stream.

A pass that replaces a parameter by, say, float8 codes plus scales records on each new parameter
*how* it derives from the original (`Derived`). `DerivedWeights` wraps any weight source and
computes those parameters as the emitter asks for them: it reads the source tensor once, keeps
its parts until the next source is needed, and never holds more than one source tensor. The time
spent quantizing is the "quantize" part of the running progress phase (`Progress.part`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from l4compile.ir.graph import Value
from l4compile.progress import current
from l4compile.weights.base import WeightSource, numpy_dtype


@dataclass(frozen=True)
class Derived:
    """Parameter = SCHEMES[scheme](source tensor, **options, **inputs)[part], reshaped and cast to the
    parameter's type. `inputs` are arrays computed before the weight stream (GPTQ's Hessian of this
    source): held by reference, left out of equality and the cache key."""

    source: Value
    scheme: str
    part: str
    options: tuple[tuple[str, Any], ...] = ()
    inputs: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)


class DerivedWeights(WeightSource):
    """Passes plain parameters through to `inner`; computes derived ones from their source."""

    def __init__(self, inner: WeightSource) -> None:
        self.inner = inner
        self.description = inner.description
        self._key: tuple | None = None
        self._parts: dict[str, np.ndarray] = {}

    def get(self, param: Value) -> np.ndarray:
        derived: Derived | None = param.derived
        if derived is None:
            return self.inner.get(param)
        if derived.scheme == "slice" and derived.source.derived is None:   # read only the rank's part
            part = self.inner.get_slice(derived.source, **dict(derived.options))
            return part.reshape(param.type.shape).astype(numpy_dtype(param.type.dtype), copy=False)
        key = (derived.source.name, derived.scheme, derived.options)
        if key != self._key:
            self._key, self._parts = None, {}   # drop the previous source's parts first
            source = self._source(derived.source)
            with current().part("quantize", unit="tensor") if derived.scheme != "slice" else nullcontext():
                self._parts = _compute(derived, source)
            self._key = key
        part = self._parts[derived.part]
        return part.reshape(param.type.shape).astype(numpy_dtype(param.type.dtype), copy=False)

    def _source(self, value: Value) -> np.ndarray:
        """A source tensor; itself derived where passes chain (a rank's slice, then quantized)."""
        if value.derived is None:
            return self.inner.get(value)
        part = _compute(value.derived, self._source(value.derived.source))[value.derived.part]
        return part.reshape(value.type.shape).astype(numpy_dtype(value.type.dtype), copy=False)

    def close(self) -> None:
        self._key, self._parts = None, {}
        self.inner.close()


def is_quantized(value: Value) -> bool:
    """A parameter computed by a quantization scheme (a rank's plain slice of a weight is not)."""
    return value.derived is not None and value.derived.scheme != "slice"


def shard_slice(w: np.ndarray, axis: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """One rank's part of a tensor-parallel parameter (l4compile.passes.shard): w[start:stop] along `axis`."""
    index = [slice(None)] * w.ndim
    index[axis] = slice(start, stop)
    return {"slice": w[tuple(index)]}


def _compute(derived: Derived, source: np.ndarray) -> dict[str, np.ndarray]:
    from l4compile.quant.schemes import SCHEMES
    schemes = {**SCHEMES, "slice": shard_slice}
    return schemes[derived.scheme](source, **dict(derived.options), **dict(derived.inputs))


def with_derived(weights: WeightSource) -> WeightSource:
    """`weights`, able to produce derived parameters (idempotent)."""
    return weights if isinstance(weights, DerivedWeights) else DerivedWeights(weights)
