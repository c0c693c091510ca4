"""The clean-ups every compiler has."""

from __future__ import annotations

from l4compile.ir.graph import Graph
from l4compile.passes.base import Pass, PassResult


class DeadCodeElimination(Pass):
    """Remove nodes whose outputs reach no graph output, and parameters and constants nobody reads."""

    name = "dce"

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
