"""Rotary embedding in one onnxruntime node: rope(x, cos, sin) -> rope{impl: ort}(x, cos, sin)."""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.ir.graph import Graph
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.rewrite import Match, Pat, Rewrite, Var, apply_rule

STANDARD_ROPE = Pat("rope", Var("x"), Var("cos"), Var("sin"), bind="rope", attrs=lambda a: a.get("impl") != "ort")


@dataclass
class RotaryEmbedding(Pass):
    """Rewrite `rope(x, cos, sin)` into `rope{impl: ort}(x, cos, sin)`, lowered to onnxruntime's
    com.microsoft RotaryEmbedding (interleaved pairs): one node instead of a dozen per query or key.

    The same math (x0 cos - x1 sin, x0 sin + x1 cos in float32). Refused (counted) where x is not
    float32 or the angle table does not have one row of positions per batch row (positions from a
    single offset for a batch of several rows, as in the sequence-major lowering): onnxruntime's op
    takes positions per row.
    """

    name = "rotary-embedding"
    description = "rotary embedding through onnxruntime's RotaryEmbedding op (onnxruntime targets)"

    def run(self, graph: Graph) -> PassResult:
        return apply_rule(graph, Rewrite(self.name, STANDARD_ROPE, _fused, where=_fusable), "nodes")


def _fusable(graph: Graph, m: Match) -> bool:
    x, cos = graph.type_of(m.values["x"]), graph.type_of(m.values["cos"])
    return x.dtype == "float32" and cos.shape[0] == x.shape[0]


def _fused(graph: Graph, m: Match) -> list[str]:
    return [graph.op("rope", [m.values["x"], m.values["cos"], m.values["sin"]], name=m.nodes["rope"].name,
                     impl="ort")]
