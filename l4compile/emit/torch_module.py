"""IR graph -> torch.nn.Module: the numerical reference and the training path.

Parameters keep their IR names as state_dict keys (nested submodules, so
`layers.0.self_attn.q_proj` is a real attribute path); forward runs each
node's torch implementation in topological order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from l4compile.ir.graph import Graph
from l4compile.ir.op import get_op
from l4compile.weights.base import WeightSource
from l4compile.weights.derived import with_derived

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Quantized parameters (codes) are buffers: they are stored, not trained.
CODE_DTYPES = {"float8e4m3fn": torch.float8_e4m3fn, "int8": torch.int8, "uint8": torch.uint8}


def _code_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """numpy codes -> torch, bit for bit (float8 goes through its uint8 view: torch has no ml_dtypes)."""
    array = np.ascontiguousarray(array)
    if dtype == "float8e4m3fn":
        return torch.from_numpy(array.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(array.copy())


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    return module, leaf


class GraphModule(nn.Module):
    """Runs an IR graph with torch. `forward(input_ids) -> logits` (the graph's first output)."""

    def __init__(self, graph: Graph, weights: WeightSource | None = None) -> None:
        super().__init__()
        self.graph = graph
        self._nodes = list(graph.topo_nodes())
        weights = with_derived(weights) if weights is not None else None
        for param in graph.params():
            owner, leaf = _owner(self, param.name)
            if param.type.dtype in CODE_DTYPES:
                data = _code_tensor(weights.get(param), param.type.dtype) if weights is not None else \
                    torch.zeros(param.type.shape, dtype=CODE_DTYPES[param.type.dtype])
                owner.register_buffer(leaf, data)
                continue
            if weights is not None:
                data = torch.from_numpy(np.array(weights.get(param), dtype=np.float32))
                data = data.to(TORCH_DTYPES[param.type.dtype])
            else:
                data = torch.zeros(param.type.shape, dtype=TORCH_DTYPES[param.type.dtype])
            owner.register_parameter(leaf, nn.Parameter(data))
        for const in graph.consts():
            owner, leaf = _owner(self, const.name)
            owner.register_buffer(leaf, torch.from_numpy(np.array(const.data)), persistent=False)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = dict(zip(self.graph.inputs, inputs))
        env.update(self.named_parameters())
        env.update(self.named_buffers())
        for node in self._nodes:
            outs = get_op(node.op).torch(torch, [env[v] for v in node.inputs], node.attrs)
            env.update(zip(node.outputs, outs))
        results = [env[name] for name in self.graph.outputs]
        return results[0] if len(results) == 1 else tuple(results)
