"""Activation ranges for FP8 activation quantization, from the torch reference.

`Calibration` runs the graph it is given (any IR graph: `GraphModule` runs every op) on a few
fixed calibration batches of token ids and records each requested value's absolute maximum.
It is what `QuantizeActivationsFP8(calibrate=...)` calls.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from l4compile.errors import BuildError
from l4compile.ir.graph import Graph
from l4compile.weights.base import WeightSource

CALIBRATION_SEED = 1234   # calibration prompts are not the prompts an accuracy report compares on


def token_batches(vocab: int, batches: int, batch_size: int, seq_len: int, seed: int) -> list[np.ndarray]:
    """Fixed token-id batches [batch_size, seq_len] (no tokenizer: ids drawn uniformly, seeded)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int64) for _ in range(batches)]


def reference_inputs(graph: Graph, ids: np.ndarray) -> list:
    """Inputs for a full forward of `graph` over `ids` from an empty KV cache (torch tensors)."""
    import torch
    sizes = {"batch": ids.shape[0], "seq": ids.shape[1]}
    inputs = []
    for name in graph.inputs:
        t = graph.type_of(name)
        if name == "input_ids":
            inputs.append(torch.from_numpy(ids))
        elif t.rank == 0:                       # past_length, logits_start
            inputs.append(torch.tensor(0, dtype=torch.int64))
        else:                                   # cached keys/values: no cached positions
            shape = [d if isinstance(d, int) else sizes.get(d, 0) for d in t.shape]
            inputs.append(torch.zeros(shape, dtype=getattr(torch, t.dtype)))
    return inputs


def vocab_size(graph: Graph) -> int:
    for node in graph.topo_nodes():
        if node.op == "embedding":
            return graph.type_of(node.inputs[1]).shape[0]
    raise BuildError(f"graph {graph.name!r} has no embedding: cannot make calibration token ids")


@dataclass(frozen=True)
class Calibration:
    """absmax of graph values over `batches` batches of `batch_size` x `seq_len` random token ids."""

    weights: WeightSource
    batches: int = 4
    batch_size: int = 2
    seq_len: int = 64
    seed: int = CALIBRATION_SEED

    def __repr__(self) -> str:
        return f"Calibration({self.batches} batches of {self.batch_size}x{self.seq_len} tokens, seed {self.seed})"

    def __call__(self, graph: Graph, values: list[str]) -> dict[str, float]:
        import torch

        from l4compile.emit.torch_module import GraphModule
        probe = copy.deepcopy(graph)   # the same graph, returning the values to observe
        probe.set_outputs(list(values))
        module = GraphModule(probe, self.weights).eval()
        absmax = dict.fromkeys(values, 0.0)
        with torch.no_grad():
            for ids in token_batches(vocab_size(graph), self.batches, self.batch_size, self.seq_len, self.seed):
                outs = module(*reference_inputs(graph, ids))
                for name, out in zip(values, outs if isinstance(outs, tuple) else (outs,)):
                    absmax[name] = max(absmax[name], float(out.abs().max()))
        return absmax
