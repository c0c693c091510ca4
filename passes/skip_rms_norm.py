"""Residual add and the norm that reads it in one onnxruntime node:
rms_norm(add(x, skip), w) -> skip_rms_norm(x, skip, w), whose second output (the sum) replaces the add's
other readers (the next residual add)."""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.ir.graph import Graph
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.properties import Property, register_property
from l4compile.passes.rewrite import Match, Pat, Rewrite, Var, apply_rule


def _check_residual_norms_fused(graph: Graph) -> str | None:
    left = [n.name for n in graph.nodes.values() if n.op == "rms_norm" and _fusable_add(graph, n.inputs[0])]
    return f"{len(left)} norm(s) still read a float32 residual add ({', '.join(left[:3])})" if left else None


register_property(Property("residual-norms-fused", "no float32 rms_norm reads a residual add: both are one "
                           "skip_rms_norm", _check_residual_norms_fused))

RESIDUAL_NORM = Pat("rms_norm", Pat("add", Var("x"), Var("skip"), bind="add"), Var("w"), bind="norm")


@dataclass
class SkipRMSNorm(Pass):
    """Rewrite `rms_norm(add(x, skip), w)` into `skip_rms_norm(x, skip, w)`, lowered to onnxruntime's
    com.microsoft SkipSimplifiedLayerNormalization: the norm's output and the sum x + skip from one node,
    so every residual add of a decoder (attention and FFN) disappears into the norm after it.
    onnxruntime's own SkipLayerNormFusion leaves these alone, because the sum has readers besides the norm.

    The same math in float32 (the sum, then x * rsqrt(mean(x^2) + eps) * w). Refused (counted) where the
    sum is not float32 (the op's half-precision kernel normalizes the unrounded sum, where rms_norm reads
    the rounded one) or x and skip differ in shape (a broadcasting add).

    Not in the onnx-cpu pipeline yet: in an int8 build (MatMulNBits at accuracy_level 4) of tiny-scout with
    this pass, a 21-token prefill then one-token steps drift from the same build's full forward by up to
    0.034 in the logits at positions 26-31 (tests/passes/test_quantize_embeddings.py); exact with
    onnxruntime's graph optimizations off (ORT_DISABLE_ALL), the drift already at ORT_ENABLE_BASIC, and
    none without this pass. Cause not found.
    """

    name = "skip-rms-norm"
    ensures = ("residual-norms-fused",)
    description = "residual add + RMSNorm through onnxruntime's SkipSimplifiedLayerNormalization (onnxruntime targets)"

    def run(self, graph: Graph) -> PassResult:
        return apply_rule(graph, Rewrite(self.name, RESIDUAL_NORM, _fused, where=_fusable), "nodes")


def _fusable_add(graph: Graph, value: str) -> bool:
    producer = graph.values[value].producer
    add = graph.nodes[producer] if producer is not None else None
    if add is None or add.op != "add":
        return False
    x, skip = (graph.type_of(v) for v in add.inputs)
    return x.dtype == "float32" and x == skip


def _fusable(graph: Graph, m: Match) -> bool:
    return _fusable_add(graph, m.nodes["add"].outputs[0])


def _fused(graph: Graph, m: Match) -> list[str]:
    norm, add = m.nodes["norm"], m.nodes["add"]
    normed, total = graph.op("skip_rms_norm", [m.values["x"], m.values["skip"], m.values["w"]], name=norm.name,
                             n_out=2, **norm.attrs)
    graph.replace_uses(add.outputs[0], total)
    return [normed]
