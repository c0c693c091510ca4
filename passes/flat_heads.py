"""Heads kept flat between the projections and GroupQueryAttention, so their reshapes cancel:

    rope{impl: ort}(split_heads(x), cos, sin) -> split_heads(rope{impl: ort}(x, cos, sin))   (x: [B, S, n*d])
    mul(split_heads(x), s)                    -> split_heads(mul(x, merge_heads(s)))         (s: [..., 1, 1])
    cache_attention(q, k, v, ...)             -> cache_attention(merge_heads(q), merge_heads(k), merge_heads(v), ...)
    genai_attention(q, k, v, ...)             -> the same
    merge_heads(split_heads(x))               -> x
"""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.ir.graph import Graph, Node
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.properties import Property, register_property
from l4compile.passes.rewrite import Match, Pat, Rewrite, Var, apply_rewrites

ATTENTION_OPS = ("cache_attention", "genai_attention")
SPLIT = Pat("split_heads", Var("x"), bind="split")
ORT_ROPE = Pat("rope", SPLIT, Var("cos"), Var("sin"), bind="rope", attrs=lambda a: a.get("impl") == "ort")
HEAD_SCALE = Pat("mul", SPLIT, Var("scale"), bind="mul")
MERGE_SPLIT = Pat("merge_heads", SPLIT)


def _check_attention_flat(graph: Graph) -> str | None:
    split = [n.name for n in graph.nodes.values() if n.op in ATTENTION_OPS and graph.type_of(n.inputs[0]).rank == 4]
    return f"{len(split)} attention node(s) read q, k, v as [B, S, H, D] ({', '.join(split[:3])})" if split else None


register_property(Property("attention-heads-flat", "GroupQueryAttention-backed attention reads q, k and v "
                           "flat, [B, S, H*D]", _check_attention_flat))


@dataclass
class FlatHeads(Pass):
    """Move split_heads below the ops that do not need the heads apart (onnxruntime's RotaryEmbedding,
    a per-position query scale) and give GroupQueryAttention its q, k and v flat, [B, S, H*D], as it
    reads them; each split_heads then meets a merge_heads and both go. Only the qk norm, which
    normalizes each head, keeps a reshape on either side. Per layer and step: v and a NoPE layer's k
    reach GroupQueryAttention straight from their MatMul, q and k of a RoPE layer through two Reshapes
    instead of four.

    The same math: only reshapes move. Left alone: the standard rope (it splits the heads itself) and a
    scale that differs between heads.
    """

    name = "flat-heads"
    ensures = ("attention-heads-flat",)
    description = "heads flat from the projections to GroupQueryAttention: their reshapes cancel (onnxruntime targets)"

    def run(self, graph: Graph) -> PassResult:
        sunk = apply_rewrites(graph, [Rewrite("rope", ORT_ROPE, _flat_rope),
                                      Rewrite("scale", HEAD_SCALE, _flat_scale, where=_per_position)])
        attention = 0
        for node in list(graph.topo_nodes()):
            if node.op in ATTENTION_OPS and graph.type_of(node.inputs[0]).rank == 4:
                _flatten_inputs(graph, node)
                attention += 1
        cancelled = apply_rewrites(graph, [Rewrite("cancel", MERGE_SPLIT, lambda g, m: [m.values["x"]])])
        stats = {"rope": sunk.get("rope", 0), "scale": sunk.get("scale", 0), "attention": attention,
                 "reshapes_cancelled": 2 * cancelled.get("cancel", 0)}
        return PassResult(any(stats.values()), stats)


def _flat_rope(graph: Graph, m: Match) -> list[str]:
    rope, split = m.nodes["rope"], m.nodes["split"]
    flat = graph.op("rope", [m.values["x"], m.values["cos"], m.values["sin"]], name=rope.name, **rope.attrs)
    return [graph.op("split_heads", [flat], name=split.name, **split.attrs)]


def _per_position(graph: Graph, m: Match) -> bool:
    """A scale the same for every head: [..., 1, 1] (the NoPE layers' temperature, [P, S, 1, 1])."""
    scale = graph.type_of(m.values["scale"])
    return scale.rank == 4 and scale.shape[2:] == (1, 1)


def _flat_scale(graph: Graph, m: Match) -> list[str]:
    mul, split = m.nodes["mul"], m.nodes["split"]
    scale = graph.op("merge_heads", [m.values["scale"]], name=f"{m.values['scale']}.flat")
    flat = graph.op("mul", [m.values["x"], scale], name=mul.name)
    return [graph.op("split_heads", [flat], name=split.name, **split.attrs)]


def _flatten_inputs(graph: Graph, node: Node) -> None:
    """The attention reads merge_heads(q), merge_heads(k), merge_heads(v) in place of q, k, v (the node keeps
    its name and outputs: its present buffers are graph outputs the runtime binds by name)."""
    flat = [graph.op("merge_heads", [value], name=f"{value}.flat") for value in node.inputs[:3]]
    graph.set_inputs(node.name, flat + node.inputs[3:])
