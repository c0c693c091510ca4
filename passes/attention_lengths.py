"""GroupQueryAttention's lengths once per layer kind, not once per layer:
cache_attention(q, k, v, ck, cv, past_lengths) -> cache_attention(q, k, v, ck, cv, past_lengths, *lengths)
with lengths = cache_lengths(past_lengths, q, ck of the kind's first layer), shared by every layer of that kind."""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.ir.graph import Graph
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.properties import Property, register_property


def _check_lengths_shared(graph: Graph) -> str | None:
    own = [n.name for n in graph.nodes.values() if n.op == "cache_attention" and len(n.inputs) == 6]
    return f"{len(own)} layer(s) compute their own lengths ({', '.join(own[:3])})" if own else None


register_property(Property("attention-lengths-shared", "every cache_attention reads GroupQueryAttention's lengths "
                           "from a cache_lengths node shared by its layer kind", _check_lengths_shared))


@dataclass
class AttentionLengths(Pass):
    """Give every `cache_attention` the seqlens_k and total length GroupQueryAttention reads, and the choice
    of a decode step by matmuls, from one `cache_lengths` node per (past_lengths, chunk_size, capacity,
    query heads per KV head): each layer otherwise derives them from past_lengths, its own query's shape
    and its buffer's, some fifteen small nodes per layer and step that all compute the same three values
    (chunked layers count past_lengths % chunk_size cached positions, global ones all).

    Nodes that already read lengths are left alone. After it, no cache_attention computes its own lengths.
    """

    name = "attention-lengths"
    ensures = ("attention-lengths-shared",)
    description = "GroupQueryAttention's sequence lengths (and the matmul-decode choice) once per layer kind " \
                  "(in-place KV caches)"

    def run(self, graph: Graph) -> PassResult:
        shared: dict[tuple, list[str]] = {}
        rewritten = 0
        for node in list(graph.topo_nodes()):
            if node.op != "cache_attention" or len(node.inputs) != 6:
                continue
            q, cache, past_lengths = node.inputs[0], node.inputs[3], node.inputs[5]
            _, kv_heads, capacity, head_dim = graph.type_of(cache).shape
            group = graph.type_of(node.outputs[0]).shape[2] // head_dim // kv_heads   # query heads per KV head
            chunk = node.attrs["chunk_size"]
            key = (past_lengths, chunk, capacity, group)
            if key not in shared:
                kind = f"chunk{chunk}" if chunk else "global"
                shared[key] = graph.op("cache_lengths", [past_lengths, q, cache], name=f"cache_lengths.{kind}", n_out=3,
                                       chunk_size=chunk, group=group)
            graph.set_inputs(node.name, node.inputs + shared[key])
            rewritten += 1
        return PassResult(rewritten > 0, {"layers": rewritten, "lengths_nodes": len(shared)})

