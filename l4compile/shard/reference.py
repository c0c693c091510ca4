"""All ranks of a sharded graph, run together with torch: the pass's numerical reference.

The ranks' graphs have the same nodes in the same order (only sizes differ), so they step in
lockstep; an all_reduce sums its input over the ranks. Used by the shard pass's tests to compare
the split with the unsharded graph, before any ONNX is involved.
"""

from __future__ import annotations

import numpy as np

from l4compile.ir.graph import Graph
from l4compile.ir.op import get_op
from l4compile.weights.base import WeightSource
from l4compile.weights.derived import with_derived


def run_ranks_torch(graphs: list[Graph], weights: WeightSource, feeds: list[dict[str, np.ndarray]]) -> list[list]:
    """Each rank's graph outputs (torch tensors) for its feeds (rank-local KV inputs differ per rank)."""
    import torch
    weights = with_derived(weights)
    envs = []
    for graph, feed in zip(graphs, feeds):
        env = {name: torch.from_numpy(np.asarray(feed[name])) for name in graph.inputs}
        for param in graph.params():
            env[param.name] = torch.from_numpy(np.array(weights.get(param), dtype=np.float32)).to(torch.float32)
        for const in graph.consts():
            env[const.name] = torch.from_numpy(np.array(const.data))
        envs.append(env)
    orders = [list(g.topo_nodes()) for g in graphs]
    for step in zip(*orders):
        if step[0].op == "all_reduce":
            total = sum(env[node.inputs[0]] for env, node in zip(envs, step))
            for env, node in zip(envs, step):
                env[node.outputs[0]] = total
            continue
        for env, node in zip(envs, step):
            outs = get_op(node.op).torch(torch, [env[v] for v in node.inputs], node.attrs)
            env.update(zip(node.outputs, outs))
    return [[env[name] for name in g.outputs] for env, g in zip(envs, graphs)]
