"""Typed, immutable description of a Llama 4 architecture.

These dataclasses are what every other part of the compiler reads. They are
built and validated by `l4compile.spec.loader` from YAML (or from an HF
config.json); nothing here parses files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

# Limits of what a build can hold: the published family has 48 layers (Behemoth's estimate 88); every
# per-layer structure (graph, manifest, inspect's table) grows with the count. Weights are addressed by
# int64 byte offsets in the ONNX external-data file.
MAX_LAYERS = 1024
MAX_WEIGHT_BYTES = 2**63 - 1

AttentionKind = Literal["chunked", "global"]
FFNKind = Literal["dense", "moe"]


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling of the rotary embedding."""

    type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 500000.0
    scaling: RopeScaling | None = None


@dataclass(frozen=True)
class TemperatureTuning:
    """NoPE layers scale queries by 1 + attn_scale * log(1 + floor((p + 1) / floor_scale))."""

    attn_scale: float = 0.1
    floor_scale: int = 8192


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int | None  # None: every layer attends globally
    qk_norm: bool
    temperature_tuning: TemperatureTuning | None
    rope: RopeSpec = field(default_factory=RopeSpec)

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    shared_expert: bool = True
    router_aux_loss_coef: float = 0.001


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower, lowered to its own graph by `l4compile.lower_vision` (with `tokens.image` set, the text
    graph fuses its features at the image tokens)."""

    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_layers: int = 34
    num_heads: int = 16
    intermediate_size: int = 5632
    vision_output_dim: int = 4096
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    pixel_shuffle_ratio: float = 0.5
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TokenSpec:
    bos: int | None = None
    eos: tuple[int, ...] = ()
    pad: int | None = None
    image: int | None = None


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer computes, resolved from the spec's layer pattern."""

    index: int
    rope: bool               # RoPE layer (chunked attention) or NoPE layer
    attention: AttentionKind
    qk_norm: bool
    temperature_tuning: bool
    ffn: FFNKind


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    attention: AttentionSpec
    nope_layers: tuple[int, ...]       # resolved: indices of NoPE (global) layers
    moe_layers: tuple[int, ...]        # resolved: indices of MoE layers
    moe: MoESpec | None = None
    dense_intermediate_size: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    tokens: TokenSpec = field(default_factory=TokenSpec)
    vision: VisionSpec | None = None
    description: str = ""
    estimate: bool = False             # shapes are an estimate, not published
    source: str | None = None          # the file it was loaded from, if any

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        nope, moe = set(self.nope_layers), set(self.moe_layers)
        chunked = self.attention.chunk_size is not None
        out = []
        for i in range(self.num_layers):
            rope = i not in nope
            out.append(LayerSpec(
                index=i,
                rope=rope,
                attention="chunked" if (rope and chunked) else "global",
                qk_norm=rope and self.attention.qk_norm,
                temperature_tuning=(not rope) and self.attention.temperature_tuning is not None,
                ffn="moe" if i in moe else "dense",
            ))
        return tuple(out)

    def to_dict(self) -> dict:
        """Plain data, in the loader's YAML layout (round-trips through `load_spec`)."""
        from l4compile.spec.dump import spec_to_dict  # local: keeps this module dependency-free
        return spec_to_dict(self)

    def content_hash(self) -> str:
        """Stable hash of everything that changes the math (not name, description or source)."""
        data = asdict(self)
        for key in ("name", "description", "source", "estimate"):
            data.pop(key)
        blob = json.dumps(data, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
