"""Weights in and out of the training model, through the same IR-name mapping every other path uses.

The training model's state_dict keys are the HF names (`hf_name_of(ir_name).hf_name`) in the HF layout,
so loading from any `WeightSource` (random, an HF checkpoint) and exporting (`export_state_dict`, which
takes IR names and layouts) are one table lookup and at most a transpose per tensor.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from l4compile.errors import WeightError
from l4compile.ir.graph import Value
from l4compile.spec.model import ModelSpec
from l4compile.weights.base import WeightSource
from l4compile.weights.hf_mapping import hf_name_of


def ir_params(spec: ModelSpec) -> list[Value]:
    """The spec's parameters, as the lowering names and shapes them (IR layout)."""
    from l4compile.lower import lower
    return lower(spec, "float32", kv_cache=False).params()


def _pairs(spec: ModelSpec) -> Iterator[tuple[Value, str, bool]]:
    for param in ir_params(spec):
        mapping = hf_name_of(param.name)
        yield param, mapping.hf_name, mapping.transpose


def load_weights(model: torch.nn.Module, source: WeightSource, spec: ModelSpec) -> None:
    """Copy every parameter of `spec` from `source` (IR names and layout) into the training model."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for param, hf_name, transpose in _pairs(spec):
            if hf_name not in own:
                raise WeightError(f"the training model has no parameter {hf_name} (for {param.name})")
            data = torch.from_numpy(np.array(source.get(param), dtype=np.float32))
            own[hf_name].copy_(data.t() if transpose else data)


def ir_state_dict(state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A training state_dict (HF names and layout) as IR-named, IR-layout tensors (views, no copies)."""
    out = {}
    for param, hf_name, transpose in _pairs(spec):
        if hf_name not in state_dict:
            raise WeightError(f"missing tensor {hf_name} (for parameter {param.name}) in the training checkpoint")
        tensor = state_dict[hf_name]
        out[param.name] = tensor.t() if transpose else tensor
    return out
