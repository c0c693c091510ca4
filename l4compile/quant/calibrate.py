"""Calibration statistics from the torch reference: activation ranges (FP8) and input Hessians (GPTQ).

`Calibration` runs the graph it is given (any IR graph: `GraphModule` runs every op) on a few
fixed calibration batches of token ids. Called, it records each requested value's absolute maximum
(what `QuantizeActivationsFP8(calibrate=...)` calls); `hessians` sums X^T X of the inputs of the
requested weights (what `QuantizeINT4(method="gptq", hessians=...)` calls).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from l4compile.errors import BuildError
from l4compile.ir.graph import Graph
from l4compile.progress import Task, current
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
        elif name == "attention_mask":          # onnxruntime-genai's decoder (l4compile.lower, kv_layout genai)
            inputs.append(torch.ones(ids.shape, dtype=torch.int64))
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

    def _batches(self, graph: Graph, what: str) -> tuple[Task, list[np.ndarray]]:
        """The calibration batches, and the "calibrate" phase that counts them (batches and tokens)."""
        batches = token_batches(vocab_size(graph), self.batches, self.batch_size, self.seq_len, self.seed)
        task = current().phase("calibrate", total=len(batches), unit="batch",
                               size_total=len(batches) * self.batch_size * self.seq_len, size_unit="token",
                               detail=f"({what} from the float32 torch reference)")
        return task, batches

    def __call__(self, graph: Graph, values: list[str]) -> dict[str, float]:
        import torch

        from l4compile.emit.torch_module import GraphModule
        probe = copy.deepcopy(graph)   # the same graph, returning the values to observe
        probe.set_outputs(list(values))
        with current().phase("load reference"):   # every weight, into the float32 torch module
            module = GraphModule(probe, self.weights).eval()
        absmax = dict.fromkeys(values, 0.0)
        task, batches = self._batches(graph, "activation ranges")
        with task, torch.no_grad():
            for ids in batches:
                outs = module(*reference_inputs(graph, ids))
                for name, out in zip(values, outs if isinstance(outs, tuple) else (outs,)):
                    absmax[name] = max(absmax[name], float(out.abs().max()))
                task.advance(1, ids.size)
        return absmax

    def hessians(self, graph: Graph, weights: list[str]) -> dict[str, np.ndarray]:
        """X^T X over the calibration tokens of what each weight multiplies: [K, K] for a linear weight,
        [E, K, K] for stacked expert weights, each expert's from the tokens routed to it (its input
        scaled by the routing score, as the expert sees it; all zero for an expert no token reached)."""
        import torch

        from l4compile.emit.torch_module import GraphModule
        wanted = set(weights)
        readers = [n for n in graph.topo_nodes() if n.op in HESSIAN_READERS and wanted & set(n.inputs)]
        values = list(dict.fromkeys(v for n in readers for v in n.inputs[:HESSIAN_READERS[n.op]]))
        probe = copy.deepcopy(graph)
        probe.set_outputs(values)
        with current().phase("load reference"):
            module = GraphModule(probe, self.weights).eval()
        params = dict(module.named_parameters())
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, gram: torch.Tensor) -> None:
            sums[name] = sums[name] + gram if name in sums else gram

        task, batches = self._batches(graph, "GPTQ Hessians")
        with task, torch.no_grad():
            for ids in batches:
                outs = module(*reference_inputs(graph, ids))
                env = dict(zip(values, outs if isinstance(outs, tuple) else (outs,)))
                for node in readers:
                    x = env[node.inputs[0]].float().reshape(-1, env[node.inputs[0]].shape[-1])
                    if node.op == "linear":
                        add(node.inputs[1], x.t() @ x)
                    else:
                        gate_up, down = (params[v].float() for v in node.inputs[2:4])
                        scores = _routing_scores(torch, node, env[node.inputs[1]])
                        grams = [_expert_grams(torch, x, scores[:, e], gate_up[e]) for e in range(scores.shape[1])]
                        add(node.inputs[2], torch.stack([g for g, _ in grams]))
                        add(node.inputs[3], torch.stack([g for _, g in grams]))
                task.advance(1, ids.size)
        return {name: gram.numpy() for name, gram in sums.items() if name in wanted}


HESSIAN_READERS = {"linear": 1, "moe_experts": 2, "moe_dispatch": 2}   # op -> how many leading inputs to record


def _routing_scores(torch, node, routing):
    """[T, E] score of each expert for each token, 0 where not routed (moe_dispatch: from the router logits)."""
    routing = routing.float().reshape(-1, routing.shape[-1])
    if node.op == "moe_experts":
        return routing
    top_value, top_index = torch.topk(routing, node.attrs["top_k"], dim=-1)
    return torch.zeros_like(routing).scatter_(-1, top_index, torch.sigmoid(top_value))


def _expert_grams(torch, x, score, gate_up):
    """(X^T X of one expert's gate_up input, of its down input) over the tokens routed to it."""
    rows = score != 0
    routed = x[rows] * score[rows, None]
    gate, up = (routed @ gate_up).chunk(2, dim=-1)
    hidden = torch.nn.functional.silu(gate) * up
    return routed.t() @ routed, hidden.t() @ hidden
