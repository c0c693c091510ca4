"""A rank's graph cut at its collectives: the onnxruntime flavour of a sharded build.

onnxruntime has no collective op, so for CPU verification each rank's graph becomes a sequence of
segments: segment k runs up to the k-th group of all_reduce nodes and returns their inputs (the
partial sums) as graph outputs; the runtime's host-side reducer sums them over the ranks and feeds
the sum to the later segments under the all_reduce's output name. Every rank's graph has the same
nodes in the same order, so every rank has the same segments and the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from l4compile.ir.graph import Graph, Node


@dataclass
class Segment:
    graph: Graph
    reductions: list[tuple[str, str]]   # after this segment: (partial value, name of its sum over ranks)


def split_at_collectives(graph: Graph) -> list[Segment]:
    """The segments of `graph`, in order; the last one ends at the graph's outputs."""
    groups: list[list[Node]] = [[]]
    reductions: list[list[tuple[str, str]]] = [[]]
    for node in graph.topo_nodes():
        if node.op == "all_reduce":
            k = len(groups) - 1 if groups[-1] or len(groups) == 1 else len(groups) - 2
            reductions[k].append((node.inputs[0], node.outputs[0]))
            if groups[-1]:
                groups.append([])
                reductions.append([])
        else:
            groups[-1].append(node)
    if not groups[-1] and len(groups) > 1:
        groups.pop()
        reductions.pop()
    later_reads: list[set[str]] = []
    reads: set[str] = set(graph.outputs)
    for group, reduced in zip(reversed(groups), reversed(reductions)):
        reads.update(partial for partial, _ in reduced)
        later_reads.append(set(reads))
        for node in group:
            reads.update(node.inputs)
    later_reads.reverse()
    return [Segment(_subgraph(graph, k, group, later_reads[k]), reduced)
            for k, (group, reduced) in enumerate(zip(groups, reductions))]


def _subgraph(graph: Graph, k: int, group: list[Node], needed: set[str]) -> Graph:
    sub = Graph(f"{graph.name}.segment{k}", metadata=dict(graph.metadata))
    produced = {out for node in group for out in node.outputs}
    for node in group:
        for v in node.inputs:
            value = graph.values[v]
            if v in sub.values or v in produced:
                continue
            if value.kind in ("param", "const"):
                sub.values[v] = value
            else:
                sub.add_input(v, value.type)
    for node in group:
        sub.add_node(Node(node.name, node.op, list(node.inputs), list(node.outputs), dict(node.attrs)),
                     [graph.values[o].type for o in node.outputs])
    sub.set_outputs([v for v in _ordered(group) if v in needed])
    return sub


def _ordered(group: list[Node]) -> list[str]:
    return [out for node in group for out in node.outputs]


def bind_external_data(segment: onnx.ModelProto, full: onnx.ModelProto) -> None:
    """Point the segment's external initializers at the rank's one data file (offsets of `full`)."""
    where = {t.name: t.external_data for t in full.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for tensor in segment.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            tensor.external_data.extend(where[tensor.name])
