"""Gate and up projections of a SwiGLU MLP as one matmul:

    silu_mul(linear(x, Wg), linear(x, Wu))               -> silu_mul(linear(x, concat(Wg, Wu, axis=1)))
    silu_mul(matmul_nbits(x, Qg, Sg), matmul_nbits(x, Qu, Su))
                                                          -> silu_mul(matmul_nbits(x, concat(Qg, Qu), concat(Sg, Su)))

(the one-input silu_mul reads gate and up as the halves of its input). The dense layers' MLPs and the shared
expert read x once in one matmul of twice the width: onnxruntime's M=1 kernels run one matrix of N=2F faster than
two of N=F (bench-1b5 int4 decode 1.07x; README). The weights stay separate in the files: onnxruntime
folds each Concat of initializers once, when the session is created. Runs after quantization (onnx-cpu's late
passes), so that each weight is quantized alone, as before; every output row is the same dot product as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.ir.graph import Graph
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.rewrite import Match, Pat, Rewrite, Var, apply_rewrites

WEIGHTS = {"linear": 1, "matmul_nbits": 2}   # op -> how many weight inputs follow x
CONCAT_AXIS = {"linear": (1,), "matmul_nbits": (0, 0)}   # the output-feature axis of each weight input


def _pattern(op: str) -> Pat:
    n = WEIGHTS[op]
    return Pat("silu_mul", Pat(op, Var("x_gate"), *(Var(f"gate{i}") for i in range(n)), bind="gate"),
               Pat(op, Var("x_up"), *(Var(f"up{i}") for i in range(n)), bind="up"), bind="act")


def _fusable(g: Graph, m: Match) -> bool:
    gate, up = m.nodes["gate"], m.nodes["up"]
    alone = all(g.users(n.outputs[0]) == [m.root] and n.outputs[0] not in g.outputs for n in (gate, up))
    params = all(g.values[w].kind == "param" for w in gate.inputs[1:] + up.inputs[1:])
    return (gate.inputs[0] == up.inputs[0] and gate.attrs == up.attrs and not gate.attrs.get("transpose_weight")
            and alone and params and gate.name != up.name)


def _fused(g: Graph, m: Match) -> list[str]:
    gate, up = m.nodes["gate"], m.nodes["up"]
    prefix = gate.name.rsplit(".", 1)[0]
    weights = [g.op("concat", [a, b], name=f"{prefix}.gate_up_weight", axis=axis)
               for a, b, axis in zip(gate.inputs[1:], up.inputs[1:], CONCAT_AXIS[gate.op])]
    both = g.op(gate.op, [gate.inputs[0]] + weights, name=f"{prefix}.gate_up", **gate.attrs)
    return [g.op("silu_mul", [both], name=m.root.name, **m.root.attrs)]


@dataclass
class FuseGateUp(Pass):
    """A SwiGLU MLP's gate and up projections (linear or matmul_nbits, the same input and attributes, read by
    nothing else) as one matmul over their weights joined along the output features."""

    name = "fuse-gate-up"
    description = "a SwiGLU MLP's gate and up projections as one matmul of twice the width (onnxruntime targets)"

    def run(self, graph: Graph) -> PassResult:
        counts = apply_rewrites(graph, [Rewrite(op, _pattern(op), _fused, where=_fusable) for op in WEIGHTS])
        stats = {"mlps": sum(counts.get(op, 0) for op in WEIGHTS),
                 "refused": sum(counts.get(f"{op}.refused", 0) for op in WEIGHTS)}
        return PassResult(stats["mlps"] > 0, stats)
