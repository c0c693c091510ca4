"""Value types of the IR: a dtype and a shape of concrete or symbolic dimensions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from l4compile.errors import IRError

# A dimension is a concrete size or a symbol ("batch", "seq", "past", "batch*seq").
Dim = Union[int, str]

DTYPES = ("float32", "float16", "bfloat16", "float8e4m3fn", "int64", "int32", "bool", "int4", "uint8", "int8")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8e4m3fn": 1, "int64": 8, "int32": 4,
               "bool": 1, "int4": 0.5, "uint8": 1, "int8": 1}


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: tuple[Dim, ...]) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def numel(self) -> int:
        """Element count of a fully concrete type (parameters, constants)."""
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise IRError(f"numel of symbolic shape {self}")
            n *= d
        return n

    def nbytes(self) -> int:
        return int(self.numel() * DTYPE_BYTES[self.dtype])

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def dim_add(a: Dim, b: Dim) -> Dim:
    """Sum of two dimensions, kept symbolic when either is a symbol."""
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a == 0:
        return b
    if b == 0:
        return a
    return f"{a}+{b}"


def broadcast_shapes(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy broadcasting over concrete and symbolic dimensions."""
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise IRError(f"cannot broadcast shapes {a} and {b}")
    return tuple(reversed(out))
