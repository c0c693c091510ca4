"""Hugging Face interop: config.json <-> spec, safetensors checkpoints as a weight source,
and export of built or trained weights as a checkpoint transformers loads."""

from l4compile.hf.checkpoint import HFCheckpoint
from l4compile.hf.config import hf_config_from_spec, load_hf_config, spec_from_hf_config

__all__ = ["HFCheckpoint", "hf_config_from_spec", "load_hf_config", "spec_from_hf_config"]
