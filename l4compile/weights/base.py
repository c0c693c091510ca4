"""The weight-source contract used by every emitter."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from l4compile.ir.graph import Value


def numpy_dtype(dtype: str) -> np.dtype:
    """numpy dtype of an IR dtype (bfloat16 and float8 through ml_dtypes)."""
    ml_names = {"bfloat16": "bfloat16", "float8e4m3fn": "float8_e4m3fn"}
    if dtype in ml_names:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, ml_names[dtype]))
    return np.dtype(dtype)


class WeightSource(ABC):
    """Yields parameters one at a time, so that peak memory stays near the largest tensor."""

    description: str = ""

    @abstractmethod
    def get(self, param: Value) -> np.ndarray:
        """The tensor for an IR parameter, in its IR dtype and shape."""

    def get_slice(self, param: Value, axis: int, start: int, stop: int) -> np.ndarray:
        """param[start:stop] along `axis` (a rank's part of a sharded parameter). Sources that can read
        only those bytes override this; by default the whole tensor is read and sliced."""
        index = [slice(None)] * len(param.type.shape)
        index[axis] = slice(start, stop)
        return self.get(param)[tuple(index)]

    def close(self) -> None:
        """Release files or maps held by the source."""
