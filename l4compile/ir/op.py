"""The op contract: one class per op with shape inference, torch and ONNX.

An op is defined in one place. `infer` gives output types from input types
and attributes; `torch` is the reference implementation (and the training
path); `onnx` lowers it to standard ONNX nodes through an `OnnxBuilder`.
Torch is passed in as a module so that the compiler imports without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from l4compile.errors import IRError
from l4compile.ir.types import TensorType

_REGISTRY: dict[str, "Op"] = {}


class Op(ABC):
    """Base of every op. `types` given to `onnx` are the input types."""

    name: str = ""

    @abstractmethod
    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        """Output types from input types and attributes; raises IRError on a mismatch."""

    @abstractmethod
    def torch(self, torch: Any, inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
        """The reference computation on torch tensors."""

    @abstractmethod
    def onnx(self, b: "OnnxBuilder", inputs: list[str], attrs: dict[str, Any],
             types: list[TensorType]) -> list[str]:
        """Emit standard ONNX nodes; returns the ONNX names of the outputs."""

    def weight_inputs(self, attrs: dict[str, Any]) -> dict[int, int]:
        """Inputs that are matmul weights, each mapped to its input-feature (reduction) axis.

        Weight-only quantization reads this: per-output-channel scales reduce over that axis.
        """
        return {}


def register(cls: type[Op]) -> type[Op]:
    op = cls()
    if not op.name or op.name in _REGISTRY:
        raise IRError(f"op name {op.name!r} missing or registered twice")
    _REGISTRY[op.name] = op
    return cls


def get_op(name: str) -> Op:
    _load_opsets()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown op {name!r}") from None


def all_ops() -> dict[str, Op]:
    _load_opsets()
    return dict(_REGISTRY)


def _load_opsets() -> None:
    from l4compile.ir import (ops_attention, ops_blocked_attention, ops_cache, ops_cache_attention,  # noqa: F401
                              ops_chunked_attention, ops_collective, ops_core, ops_genai, ops_moe, ops_moe_dispatch,
                              ops_quant, ops_vision)  # (registration side effect)


def expect(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise IRError(f"{op}: {message}")


ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
               "bfloat16": 16, "float8e4m3fn": 17, "int4": 22}


class OnnxBuilder:
    """Collects ONNX nodes and constants; ops call `node` and `const`."""

    def __init__(self, opset: int) -> None:
        import onnx.helper  # local: the builder is only needed by the emitter
        self._helper = onnx.helper
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()
        self._const_cache: dict[tuple, str] = {}
        self.scope = "n"

    def fresh(self, hint: str) -> str:
        base = f"{self.scope}/{hint}"
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(self._helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type + "_node"),
                                                 domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    @contextmanager
    def capture(self) -> Iterator[list[Any]]:
        """Nodes emitted inside the block go to the yielded list (a Loop or If body), not to the graph."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    def const(self, value: Any, dtype: str | None = None) -> str:
        """A small constant, deduplicated by value."""
        import onnx.numpy_helper
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = self.fresh("const")
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def int64s(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, value: float, dtype: str = "float32") -> str:
        return self.const(np.array(value, dtype=dtype))

