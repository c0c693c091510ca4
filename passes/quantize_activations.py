"""FP8 activation quantization: explicit Q/DQ pairs, as TensorRT builds FP8 kernels from them.

After `quantize-fp8`, every op that reads float8 weights (linear, moe_experts, moe_dispatch, ...)
gets a per-tensor QuantizeLinear / DequantizeLinear pair on its activation input, with scale =
calibrated absmax / 448. Other readers of the same activation (the router) keep reading it in
high precision. onnxruntime's CPU provider runs the pairs too, which is how this is tested here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from l4compile.errors import PassError
from l4compile.ir.graph import Graph, Node
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.properties import Property, producer_op, register_property
from l4compile.passes.quantize import fp8_weight_readers
from l4compile.quant.schemes import FP8_MAX

ActivationRanges = Callable[[Graph, list[str]], dict[str, float]]


def _check_activations_unquantized(graph: Graph) -> str | None:
    done = [n.name for n in graph.nodes.values() if n.op == "quantize"]
    return f"{len(done)} activation(s) already have Q/DQ ({', '.join(done[:3])})" if done else None


def _check_activations_fp8(graph: Graph) -> str | None:
    bare = [n.name for n in fp8_weight_readers(graph) if producer_op(graph, n.inputs[0]) != "dequantize"]
    return f"{len(bare)} op(s) read fp8 weights with a high-precision input ({', '.join(bare[:3])})" if bare else None


register_property(Property("activations-unquantized", "no activation has a Q/DQ pair yet",
                           _check_activations_unquantized))
register_property(Property("activations-fp8", "every op reading float8 weights reads a Q/DQ'd input",
                           _check_activations_fp8))


def UNCALIBRATED(graph: Graph, values: list[str]) -> dict[str, float]:  # noqa: N802 (a constant-like function)
    """No ranges: every activation scale is 1.0 (dry runs, which check the graph without weights)."""
    return {}


@dataclass
class QuantizeActivationsFP8(Pass):
    """A per-tensor Q/DQ pair on the activation input of every op reading fp8 weights.

    `calibrate(graph, values)` gives each value's absmax over the calibration batches
    (`l4compile.quant.calibrate.Calibration`, which `build` supplies from its weights); the scale is
    absmax / 448. A value it gives no range for gets scale 1.0 (`UNCALIBRATED`, for dry runs).
    """

    calibrate: ActivationRanges | None = None

    name: ClassVar[str] = "quantize-fp8-activations"
    description: ClassVar[str] = ("calibrated per-tensor float8 Q/DQ on the inputs of ops with fp8 weights "
                                  "(explicit quantization for TensorRT)")
    requires: ClassVar[tuple[str, ...]] = ("weights-fp8", "activations-unquantized")
    ensures: ClassVar[tuple[str, ...]] = ("activations-fp8",)

    def run(self, graph: Graph) -> PassResult:
        if self.calibrate is None:
            raise PassError(f"pass {self.name} needs activation ranges: build with --quantize fp8 "
                            "--quantize-activations, which calibrates on the build's weights")
        readers = fp8_weight_readers(graph)
        activations = list(dict.fromkeys(node.inputs[0] for node in readers))
        ranges = self.calibrate(graph, activations)
        for value in activations:
            absmax = ranges.get(value, FP8_MAX)
            dtype = graph.type_of(value).dtype
            scale = graph.add_const(graph.fresh_name(f"{value}.act_scale"),
                                    np.array(max(absmax, 1e-12) / FP8_MAX, dtype=dtype))
            q = graph.op("quantize", [value, scale], name=f"{value}.quantize")
            dq = graph.op("dequantize", [q, scale], name=f"{value}.dequantize")
            for node in readers:
                if node.inputs[0] == value:
                    _replace_input(graph, node, 0, dq)
        return PassResult(bool(activations), {"qdq_pairs": len(activations), "calibrated": int(bool(ranges))})


def _replace_input(graph: Graph, node: Node, index: int, value: str) -> None:
    """Make one input of one node read `value` (Graph.replace_uses rewires every reader)."""
    old = node.inputs[index]
    node.inputs[index] = value
    graph.nx.add_edge(graph.values[value].producer, node.name)
    old_producer = graph.values[old].producer
    if old_producer is not None and not any(graph.values[v].producer == old_producer for v in node.inputs):
        graph.nx.remove_edge(old_producer, node.name)
