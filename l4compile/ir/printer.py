"""A stable text form of the IR, for golden tests and --print-ir."""

from __future__ import annotations

from typing import Any

from l4compile.ir.graph import Graph


def _attr(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 9))
    return repr(value)


def print_ir(graph: Graph, params: bool = True) -> str:
    ins = ", ".join(f"%{v}: {graph.values[v].type}" for v in graph.inputs)
    outs = ", ".join(f"%{v}: {graph.values[v].type}" for v in graph.outputs)
    lines = [f"graph {graph.name}({ins}) -> ({outs}) {{"]
    if params:
        lines += [f"  param %{v.name}: {v.type}" for v in graph.params()]
    lines += [f"  const %{v.name}: {v.type}" for v in graph.consts()]
    for node in graph.topo_nodes():
        attrs = ", ".join(f"{k}={_attr(node.attrs[k])}" for k in sorted(node.attrs))
        results = ", ".join(f"%{o}" for o in node.outputs)
        types = ", ".join(str(graph.values[o].type) for o in node.outputs)
        args = ", ".join(f"%{i}" for i in node.inputs)
        lines.append(f"  {results} = {node.op}({args}){' {' + attrs + '}' if attrs else ''} : {types}")
    lines.append("}")
    return "\n".join(lines)
