"""Weight sources: anything that yields one parameter tensor at a time, by IR name."""

from l4compile.weights.base import WeightSource, numpy_dtype
from l4compile.weights.random import RandomWeights

__all__ = ["WeightSource", "RandomWeights", "numpy_dtype"]
