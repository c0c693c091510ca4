"""The clean-ups every compiler has: dead code, constant folding, common subexpressions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l4compile.ir.graph import Graph, Node
from l4compile.ir.types import TensorType
from l4compile.passes.base import Pass, PassResult

# Dtypes onnxruntime hands back as numpy arrays (no bfloat16, float8 or int4 there).
FOLDABLE_DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


@dataclass
class DeadCodeElimination(Pass):
    """Remove nodes whose outputs reach no graph output, and parameters and constants nobody reads."""

    name = "dce"
    description = "remove nodes, parameters and constants that no graph output depends on"

    def run(self, graph: Graph) -> PassResult:
        live = set(graph.outputs)
        removed = 0
        for node in reversed(list(graph.topo_nodes())):
            if any(out in live for out in node.outputs):
                live.update(node.inputs)
            else:
                graph.remove_node(node.name)
                removed += 1
        unused = [v.name for v in graph.values.values() if v.kind in ("param", "const") and v.name not in live]
        for name in unused:
            del graph.values[name]
        return PassResult(bool(removed or unused), {"nodes_removed": removed, "values_removed": len(unused)})


@dataclass
class ConstantFolding(Pass):
    """Evaluate nodes whose inputs are all constants, once at compile time (with onnxruntime, which is
    always installed, through the op's own ONNX lowering); results over `max_bytes` stay computed."""

    max_bytes: int = 1 << 20

    name = "constant-fold"
    description = "evaluate nodes whose inputs are all constants at compile time"

    def run(self, graph: Graph) -> PassResult:
        folded = left = 0
        for node in list(graph.topo_nodes()):
            if not node.inputs or any(graph.values[v].kind != "const" for v in node.inputs):
                continue
            outs = [graph.type_of(o) for o in node.outputs]
            if not all(_concrete(t) and t.dtype in FOLDABLE_DTYPES and t.nbytes() <= self.max_bytes for t in outs):
                left += 1   # constant, but too large to store (or of a type onnxruntime cannot hand back)
                continue
            arrays = _evaluate(graph, node)
            graph.remove_node(node.name)
            for out, array in zip(node.outputs, arrays):
                graph.add_const(out, array)   # readers refer to the value by name: nothing else to rewire
            folded += 1
        return PassResult(folded > 0, {"nodes_folded": folded, "left_computed": left})


def _concrete(t: TensorType) -> bool:
    return all(isinstance(d, int) for d in t.shape)


def _evaluate(graph: Graph, node: Node) -> list[np.ndarray]:
    import onnxruntime as ort

    from l4compile.emit.onnx_emitter import emit_onnx
    g = Graph(f"fold_{node.name}")
    for v in node.inputs:
        if v not in g.values:
            g.add_const(v, graph.values[v].data)
    outs = g.op(node.op, node.inputs, name="folded", n_out=len(node.outputs), **node.attrs)
    g.set_outputs(outs if isinstance(outs, list) else [outs])
    session = ort.InferenceSession(emit_onnx(g, None, None).model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {})


@dataclass
class CommonSubexpressionElimination(Pass):
    """Merge equal constants, then nodes with the same op, inputs and attributes (e.g. a mask or a
    rotary table that a rewrite built once per layer becomes one per model)."""

    name = "cse"
    description = "merge equal constants and nodes that compute the same thing (one mask per model, not per layer)"

    def run(self, graph: Graph) -> PassResult:
        consts = self._merge_consts(graph)
        seen: dict[tuple, Node] = {}
        merged = 0
        for node in list(graph.topo_nodes()):
            key = (node.op, tuple(node.inputs), repr(sorted(node.attrs.items())))
            first = seen.setdefault(key, node)
            if first is node or any(o in graph.outputs for o in node.outputs):
                continue
            for old, new in zip(node.outputs, first.outputs):
                graph.replace_uses(old, new)
            graph.remove_node(node.name)
            merged += 1
        return PassResult(bool(merged or consts), {"nodes_merged": merged, "consts_merged": consts})

    @staticmethod
    def _merge_consts(graph: Graph) -> int:
        seen: dict[tuple, str] = {}
        merged = 0
        for value in list(graph.consts()):
            key = (value.type, value.data.tobytes())
            first = seen.setdefault(key, value.name)
            if first != value.name and value.name not in graph.outputs:
                graph.replace_uses(value.name, first)
                del graph.values[value.name]
                merged += 1
        return merged
