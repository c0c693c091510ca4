"""The IR graph: typed values and ops, held in a networkx DiGraph of nodes.

Values are named; a node reads values and produces values. networkx gives
order and traversal; the op registry (`l4compile.ir.op`) gives the meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import numpy as np

from l4compile.errors import IRError
from l4compile.ir.types import TensorType


@dataclass
class Value:
    name: str
    type: TensorType
    kind: str  # "input" | "param" | "const" | "node"
    producer: str | None = None          # node name for kind == "node"
    data: np.ndarray | None = None       # for kind == "const"
    init: str = "normal"                 # for kind == "param": how random weights are drawn
    derived: Any = None                  # for kind == "param": computed from another parameter
                                         # (a `l4compile.weights.derived.Derived`, e.g. quantized)


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


class Graph:
    """A dataflow graph of IR ops over named, typed values."""

    def __init__(self, name: str, metadata: dict[str, str] | None = None) -> None:
        self.name = name
        self.metadata: dict[str, str] = dict(metadata or {})
        self.values: dict[str, Value] = {}
        self.nodes: dict[str, Node] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.nx = nx.DiGraph()
        self._counter = 0

    # ---- building -------------------------------------------------------
    def _new_value(self, value: Value) -> str:
        if value.name in self.values:
            raise IRError(f"value {value.name!r} defined twice")
        self.values[value.name] = value
        return value.name

    def add_input(self, name: str, type: TensorType) -> str:
        self.inputs.append(name)
        return self._new_value(Value(name, type, "input"))

    def add_param(self, name: str, type: TensorType, init: str = "normal", derived: Any = None) -> str:
        return self._new_value(Value(name, type, "param", init=init, derived=derived))

    def add_const(self, name: str, data: np.ndarray) -> str:
        from l4compile.ir.types import DTYPES
        dtype = str(data.dtype)
        if dtype not in DTYPES:
            raise IRError(f"constant {name!r} has unsupported dtype {dtype}")
        return self._new_value(Value(name, TensorType(dtype, tuple(data.shape)), "const", data=data))

    def fresh_name(self, hint: str) -> str:
        name = hint
        while name in self.values or name in self.nodes:
            self._counter += 1
            name = f"{hint}.{self._counter}"
        return name

    def op(self, op: str, inputs: list[str], name: str, n_out: int = 1, outputs: list[str] | None = None,
           **attrs: Any) -> Any:
        """Add a node; infer and record its output types. Returns the output name(s).

        `outputs` names the outputs (e.g. graph outputs a runtime binds by name); by default they are
        named after the node."""
        from l4compile.ir.op import get_op
        node_name = self.fresh_name(name)
        if outputs is not None:
            n_out, outs = len(outputs), [self.fresh_name(o) for o in outputs]
        else:
            outs = [node_name] if n_out == 1 else [self.fresh_name(f"{node_name}.{i}") for i in range(n_out)]
        node = Node(node_name, op, list(inputs), outs, dict(attrs))
        for v in inputs:
            if v not in self.values:
                raise IRError(f"node {node_name!r} ({op}) reads undefined value {v!r}")
        types = get_op(op).infer([self.values[v].type for v in inputs], node.attrs)
        self.add_node(node, types)
        return outs[0] if n_out == 1 else outs

    def add_node(self, node: Node, types: list[TensorType]) -> None:
        if len(types) != len(node.outputs):
            raise IRError(f"{node.op} gives {len(types)} outputs, node {node.name!r} names {len(node.outputs)}")
        self.nodes[node.name] = node
        self.nx.add_node(node.name)
        for out, t in zip(node.outputs, types):
            self._new_value(Value(out, t, "node", producer=node.name))
        for v in node.inputs:
            producer = self.values[v].producer
            if producer is not None:
                self.nx.add_edge(producer, node.name)

    def set_outputs(self, names: list[str]) -> None:
        self.outputs = list(names)

    # ---- editing (passes) -----------------------------------------------
    def remove_node(self, name: str) -> None:
        node = self.nodes.pop(name)
        self.nx.remove_node(name)
        for out in node.outputs:
            self.values.pop(out, None)

    def set_inputs(self, name: str, inputs: list[str]) -> None:
        """Make node `name` read `inputs` (a node that must keep its name and outputs, e.g. graph outputs)."""
        node = self.nodes[name]
        for v in inputs:
            if v not in self.values:
                raise IRError(f"node {name!r} ({node.op}) would read undefined value {v!r}")
        self.nx.remove_edges_from(list(self.nx.in_edges(name)))
        node.inputs = list(inputs)
        for v in inputs:
            producer = self.values[v].producer
            if producer is not None:
                self.nx.add_edge(producer, name)

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of `old` read `new` instead."""
        for node in self.nodes.values():
            if old in node.inputs:
                node.inputs = [new if v == old else v for v in node.inputs]
                producer = self.values[new].producer
                if producer is not None:
                    self.nx.add_edge(producer, node.name)
                old_producer = self.values[old].producer if old in self.values else None
                if old_producer is not None and old_producer != producer and self.nx.has_edge(old_producer, node.name) \
                        and not any(self.values[v].producer == old_producer for v in node.inputs):
                    self.nx.remove_edge(old_producer, node.name)
        self.outputs = [new if v == old else v for v in self.outputs]

    # ---- reading ----------------------------------------------------------
    def topo_nodes(self) -> Iterator[Node]:
        """Nodes in a deterministic topological order (insertion order breaks ties)."""
        rank = {n: i for i, n in enumerate(self.nodes)}
        for name in nx.lexicographical_topological_sort(self.nx, key=rank.__getitem__):
            yield self.nodes[name]

    def params(self) -> list[Value]:
        return [v for v in self.values.values() if v.kind == "param"]

    def consts(self) -> list[Value]:
        return [v for v in self.values.values() if v.kind == "const"]

    def users(self, value: str) -> list[Node]:
        return [n for n in self.nodes.values() if value in n.inputs]

    def type_of(self, value: str) -> TensorType:
        return self.values[value].type
