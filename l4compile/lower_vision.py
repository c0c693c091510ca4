"""Lowering of the vision tower: a ModelSpec's `vision` section becomes its own IR graph.

    pixel_values [tiles, C, S, S] -> image_features [tiles * tokens_per_tile, text hidden]

What transformers' Llama4VisionModel + Llama4MultiModalProjector compute: unfold patches and embed
them (no bias), append the class token, add learned positions, LayerNorm, pre-norm ViT layers (biased
q/k/v/o, non-causal attention with the 2D rotary embedding, GELU MLP), LayerNorm, drop the class
token, pixel shuffle, the two-layer GELU adapter, the projector. Parameter names are the checkpoint's
own (`vision_model.model.layers.0.self_attn.q_proj.weight`); linear weights are stored [in, out].
"""

from __future__ import annotations

import numpy as np

from l4compile.ir.graph import Graph
from l4compile.ir.types import TensorType
from l4compile.spec.extras import VISION_LAYER_NORM_EPS
from l4compile.spec.model import ModelSpec, VisionSpec

TILES, IMAGE_TOKENS = "tiles", "image_tokens"
PIXELS, FEATURES = "pixel_values", "image_features"
# transformers builds every vision LayerNorm as nn.LayerNorm(hidden_size): eps 1e-5 (a spec must say so)
LAYER_NORM_EPS = VISION_LAYER_NORM_EPS


def patches_per_side(vision: VisionSpec) -> int:
    return vision.image_size // vision.patch_size


def tokens_per_tile(vision: VisionSpec) -> int:
    """Image features per tile: the patch grid after pixel shuffle (144 for a 336-pixel tile)."""
    return round(patches_per_side(vision) * vision.pixel_shuffle_ratio) ** 2


def vision_rope_tables(vision: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [1, patches + 1, head_dim / 2] of the 2D rotary embedding (Llama4VisionRotaryEmbedding).

    Pair j < head_dim/4 turns with the patch's column + 1, pair head_dim/4 + j with its row + 1, both at
    frequency theta^(-4j/head_dim); the class token (last) does not turn.
    """
    side = patches_per_side(vision)
    head_dim = vision.hidden_size // vision.num_heads
    freq_dim = head_dim // 2
    rope_freq = 1.0 / (vision.rope_theta ** (np.arange(0, freq_dim, 2)[: freq_dim // 2].astype(np.float32) / freq_dim))
    index = np.arange(side * side)
    cols, rows = (index % side + 1).astype(np.float32), (index // side + 1).astype(np.float32)
    angles = np.concatenate([cols[:, None] * rope_freq[None], rows[:, None] * rope_freq[None]], axis=1)
    angles = np.concatenate([angles, np.zeros((1, angles.shape[1]), np.float32)]).astype(np.float32)
    return np.cos(angles)[None].astype(np.float32), np.sin(angles)[None].astype(np.float32)


def has_image_input(spec: ModelSpec) -> bool:
    """A spec with a vision tower and an image token: its text graph reads image features."""
    return spec.vision is not None and spec.tokens.image is not None


def fuse_image_features(g: Graph, spec: ModelSpec, ids: str, embeds: str, dtype: str) -> str:
    """The text graph's input `image_features` [image_tokens, hidden] placed, in order, at the positions
    of the image token (empty [0, hidden] when a step has no image)."""
    features = g.add_input(FEATURES, TensorType(dtype, (IMAGE_TOKENS, spec.hidden_size)))
    return g.op("merge_image_features", [embeds, ids, features], name="image_fusion", image_token=spec.tokens.image)


def lower_vision(spec: ModelSpec, dtype: str = "float32") -> Graph:
    """The vision graph of `spec` (which must have a vision section)."""
    v = spec.vision
    g = Graph(f"{spec.name}-vision", metadata={"l4compile.spec_hash": spec.content_hash()})
    pixels = g.add_input(PIXELS, TensorType(dtype, (TILES, v.num_channels, v.image_size, v.image_size)))
    patches = patches_per_side(v) ** 2
    p = "vision_model"
    x = g.op("patch_unfold", [pixels], name=f"{p}.patches", patch_size=v.patch_size)
    x = _linear(g, f"{p}.patch_embedding.linear", x, v.num_channels * v.patch_size ** 2, v.hidden_size, dtype,
                bias=False)
    x = g.op("append_token", [x, _param(g, f"{p}.class_embedding", (v.hidden_size,), dtype)], name=f"{p}.class_token")
    x = g.op("add", [x, _param(g, f"{p}.positional_embedding_vlm", (patches + 1, v.hidden_size), dtype)],
             name=f"{p}.positions")
    x = _layer_norm(g, f"{p}.layernorm_pre", x, v.hidden_size, dtype)
    cos_table, sin_table = vision_rope_tables(v)
    rope = (g.add_const(f"{p}.rope.cos", cos_table), g.add_const(f"{p}.rope.sin", sin_table))
    mask = g.add_const(f"{p}.attention_mask", np.zeros((1, 1, patches + 1, patches + 1), np.float32))
    for i in range(v.num_layers):
        x = _encoder_layer(g, v, f"{p}.model.layers.{i}", x, rope, mask, dtype)
    x = _layer_norm(g, f"{p}.layernorm_post", x, v.hidden_size, dtype)
    x = g.op("drop_last_token", [x], name=f"{p}.drop_class_token")
    x = g.op("pixel_shuffle", [x], name=f"{p}.pixel_shuffle", ratio=v.pixel_shuffle_ratio)
    a = f"{p}.vision_adapter.mlp"
    x = g.op("gelu", [_linear(g, f"{a}.fc1", x, v.intermediate_size, v.projector_input_dim, dtype, bias=False)],
             name=f"{a}.act1")
    x = g.op("gelu", [_linear(g, f"{a}.fc2", x, v.projector_output_dim, v.projector_output_dim, dtype, bias=False)],
             name=f"{a}.act2")
    x = g.op("flatten_tiles", [x], name="image_tokens")
    features = _linear(g, "multi_modal_projector.linear_1", x, v.vision_output_dim, spec.hidden_size, dtype,
                       bias=False, name=FEATURES)
    g.set_outputs([features])
    return g


def _param(g: Graph, name: str, shape: tuple[int, ...], dtype: str, init: str = "normal") -> str:
    return g.add_param(name, TensorType(dtype, shape), init=init)


def _linear(g: Graph, p: str, x: str, n_in: int, n_out: int, dtype: str, bias: bool = True,
            name: str | None = None) -> str:
    y = g.op("linear", [x, _param(g, f"{p}.weight", (n_in, n_out), dtype)], name=p if bias or not name else name)
    if bias:
        y = g.op("add", [y, _param(g, f"{p}.bias", (n_out,), dtype, "bias")], name=name or f"{p}.biased")
    return y


def _layer_norm(g: Graph, p: str, x: str, hidden: int, dtype: str) -> str:
    return g.op("layer_norm", [x, _param(g, f"{p}.weight", (hidden,), dtype, "norm"),
                               _param(g, f"{p}.bias", (hidden,), dtype, "bias")], name=p, eps=LAYER_NORM_EPS)


def _encoder_layer(g: Graph, v: VisionSpec, p: str, x: str, rope: tuple[str, str], mask: str, dtype: str) -> str:
    """Llama4VisionEncoderLayer: x + attention(LayerNorm(x)), then + MLP(LayerNorm(.))."""
    h, heads = v.hidden_size, v.num_heads
    head_dim = h // heads
    normed = _layer_norm(g, f"{p}.input_layernorm", x, h, dtype)

    def project(name: str) -> str:
        flat = _linear(g, f"{p}.self_attn.{name}_proj", normed, h, h, dtype)
        return g.op("split_heads", [flat], name=f"{p}.self_attn.{name}_heads", num_heads=heads, head_dim=head_dim)

    q, k, val = project("q"), project("k"), project("v")
    q = g.op("rope", [q, *rope], name=f"{p}.self_attn.q_rope")
    k = g.op("rope", [k, *rope], name=f"{p}.self_attn.k_rope")
    attended = g.op("attention", [q, k, val, mask], name=f"{p}.self_attn.attention", scale=head_dim ** -0.5)
    x = g.op("add", [x, _linear(g, f"{p}.self_attn.o_proj", attended, h, h, dtype)], name=f"{p}.attn_residual")
    normed = _layer_norm(g, f"{p}.post_attention_layernorm", x, h, dtype)
    hidden = g.op("gelu", [_linear(g, f"{p}.mlp.fc1", normed, h, v.intermediate_size, dtype)], name=f"{p}.mlp.act")
    return g.op("add", [x, _linear(g, f"{p}.mlp.fc2", hidden, v.intermediate_size, h, dtype)], name=f"{p}.mlp_residual")
