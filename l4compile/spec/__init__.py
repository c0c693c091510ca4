"""The spec language: YAML files describing a Llama 4 architecture, validated into
the frozen dataclasses of `l4compile.spec.model`."""

from l4compile.spec.dump import dump_spec_yaml, spec_to_dict
from l4compile.spec.loader import load_spec, loads_spec
from l4compile.spec.model import (AttentionSpec, LayerSpec, ModelSpec, MoESpec, RopeScaling,
                                  RopeSpec, TemperatureTuning, TokenSpec, VisionSpec)

__all__ = [
    "AttentionSpec", "LayerSpec", "ModelSpec", "MoESpec", "RopeScaling", "RopeSpec",
    "TemperatureTuning", "TokenSpec", "VisionSpec",
    "dump_spec_yaml", "load_spec", "loads_spec", "spec_to_dict",
]
