"""Collectives between the ranks of a sharded graph (see l4compile.passes.shard).

A per-rank graph computes part of the model; a collective joins the ranks' partial values. The
ONNX lowering is the node TensorRT's parser imports as an in-engine NCCL collective
(`DistCollective`, TensorRT >= 10.16, the form NVIDIA's Polygraphy `multi-device shard` tool writes:
default domain, string attributes `collective_operation` and `reduce_op`, ints `root`,
`group_size`, `nb_rank`). onnxruntime has no such op: the CPU flavour of a sharded build cuts each
rank's graph at its collectives and the runtime's host-side reducer does the sum
(l4compile.shard.segments, runtime/sharded_backend.py).
"""

from __future__ import annotations

from l4compile.errors import IRError
from l4compile.ir.op import Op, expect, register

DIST_COLLECTIVE = "DistCollective"


@register
class AllReduce(Op):
    """x (this rank's partial sum) -> the sum of x over the `ranks` ranks, on every rank."""

    name = "all_reduce"

    def infer(self, inputs, attrs):
        (x,) = inputs
        expect(attrs["ranks"] >= 1, self.name, f"ranks must be >= 1, got {attrs['ranks']}")
        expect(attrs.get("reduce", "sum") == "sum", self.name, f"only sum is supported, got {attrs.get('reduce')!r}")
        return [x]

    def torch(self, torch, inputs, attrs):
        (x,) = inputs
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            out = x.clone()
            dist.all_reduce(out)
            return [out]
        if attrs["ranks"] == 1:
            return [x]
        raise IRError(f"all_reduce over {attrs['ranks']} ranks needs an initialised torch.distributed group "
                      "(or run the ranks together: l4compile.shard.run_ranks_torch)")

    def onnx(self, b, inputs, attrs, types):
        return [b.node(DIST_COLLECTIVE, inputs, collective_operation="all_reduce", reduce_op="sum", root=-1,
                       group_size=0, nb_rank=attrs["ranks"])]
