"""The IR verifier: run after lowering and after every pass in tests and with --verify."""

from __future__ import annotations

import networkx as nx

from l4compile.errors import IRError
from l4compile.ir.graph import Graph
from l4compile.ir.op import get_op


def verify(graph: Graph) -> None:
    """Raise IRError on cycles, dangling or doubly-defined values, or types that do not re-infer."""
    if not nx.is_directed_acyclic_graph(graph.nx):
        cycle = nx.find_cycle(graph.nx)
        raise IRError(f"graph {graph.name!r} has a cycle through {[edge[0] for edge in cycle]}")
    if set(graph.nx.nodes) != set(graph.nodes):
        raise IRError("networkx view and node table disagree")
    produced: dict[str, str] = {}
    for node in graph.nodes.values():
        for out in node.outputs:
            if out in produced:
                raise IRError(f"value {out!r} produced by both {produced[out]!r} and {node.name!r}")
            produced[out] = node.name
            value = graph.values.get(out)
            if value is None or value.producer != node.name:
                raise IRError(f"output {out!r} of {node.name!r} is not registered as produced by it")
    for node in graph.topo_nodes():
        for v in node.inputs:
            value = graph.values.get(v)
            if value is None:
                raise IRError(f"node {node.name!r} ({node.op}) reads dangling value {v!r}")
            if value.kind == "node" and not graph.nx.has_edge(value.producer, node.name):
                raise IRError(f"edge {value.producer!r} -> {node.name!r} missing for value {v!r}")
        expected = get_op(node.op).infer([graph.values[v].type for v in node.inputs], node.attrs)
        actual = [graph.values[o].type for o in node.outputs]
        if expected != actual:
            raise IRError(f"node {node.name!r} ({node.op}) records types {[str(t) for t in actual]}, "
                          f"inference gives {[str(t) for t in expected]}")
    for out in graph.outputs:
        if out not in graph.values:
            raise IRError(f"graph output {out!r} is not defined")
    for v in graph.values.values():
        if v.kind == "node" and v.producer not in graph.nodes:
            raise IRError(f"value {v.name!r} names a removed producer {v.producer!r}")
