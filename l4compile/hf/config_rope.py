"""Rotary parameters of a config.json: transformers 5's `rope_parameters`, or the older
`rope_scaling` + `rope_theta` (which transformers 5 still reads, and prefers when both are set)."""

from __future__ import annotations

from l4compile.hf.config_keys import LAYER_TYPES, ROPE_KEYS
from l4compile.hf.config_reader import REQUIRED, ConfigSection
from l4compile.spec.model import RopeScaling, RopeSpec

ROPE_TYPES = ("default", "llama3")


def read_rope(section: ConfigSection) -> RopeSpec:
    """The RopeSpec of a text or vision config section."""
    legacy = section.raw("rope_scaling") if "rope_scaling" in section.defaults else None
    key = "rope_scaling" if legacy else "rope_parameters"
    params = legacy or section.raw("rope_parameters")
    if "partial_rotary_factor" in section.defaults:
        section.expect("partial_rotary_factor", 1.0, "rotary over the whole head")
    if params is None:
        return RopeSpec(theta=section.float("rope_theta"))
    if isinstance(params, dict) and set(params) & set(LAYER_TYPES):
        raise section.error(key, "per-layer-type rope parameters are not supported (Llama 4 uses one set)")
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else None
    defaults = {k: REQUIRED for k in ROPE_KEYS}
    defaults.update(rope_type=kind, type=kind, rope_theta=section.raw("rope_theta"), partial_rotary_factor=1.0)
    if "max_position_embeddings" in section.defaults:
        defaults["original_max_position_embeddings"] = section.raw("max_position_embeddings")
    rope = ConfigSection(params, file=section.file, path=section.field(key), defaults=defaults)
    if kind not in ROPE_TYPES:
        raise rope.error("rope_type", f"expected one of {ROPE_TYPES} (the rotary embeddings Llama 4 uses), "
                                      f"found {kind!r}")
    rope.expect("partial_rotary_factor", 1.0, "rotary over the whole head")
    theta = rope.float("rope_theta")
    if kind == "default":
        return RopeSpec(theta=theta)
    return RopeSpec(theta=theta, scaling=RopeScaling(
        type="llama3", factor=rope.float("factor"), low_freq_factor=rope.float("low_freq_factor"),
        high_freq_factor=rope.float("high_freq_factor"),
        original_max_position_embeddings=rope.int("original_max_position_embeddings")))


def rope_parameters(rope: RopeSpec) -> dict:
    """transformers 5's `rope_parameters` for a RopeSpec."""
    out: dict = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.scaling is not None:
        s = rope.scaling
        out.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                   high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_position_embeddings)
    return out
