"""Lowering: a ModelSpec becomes the straightforward IR graph of the text model.

Straightforward on purpose: MoE layers run every expert and mask by score,
chunked attention goes through an explicit [S, T] mask. Passes make it fast.
Parameter names follow the HF text model (without the `model.` prefix and
`.weight` suffix); linear weights are stored [in, out].
"""

from __future__ import annotations

from dataclasses import dataclass

from l4compile import rope
from l4compile.ir.graph import Graph
from l4compile.ir.types import TensorType
from l4compile.lower_vision import fuse_image_features, has_image_input
from l4compile.spec.model import LayerSpec, ModelSpec

BATCH, SEQ = "batch", "seq"
PAST = {"chunked": "past_chunk", "global": "past"}  # cached positions: chunked layers keep only their chunk
# In-place caches: a buffer of `chunk` slots for chunked layers, the whole context for global ones.
CAPACITY = {"chunked": "kv_chunk", "global": "kv_capacity"}
KV_LAYOUTS = ("sequence-major", "in-place", "genai")
# kv_layout "genai": onnxruntime-genai's decoder names (l4compile/genai.py writes its genai_config.json).
GENAI_NAMES = {"input_ids": "input_ids", "attention_mask": "attention_mask", "logits": "logits",
               "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
               "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}


@dataclass
class _Shared:
    """Values computed once per model and read by every layer of a kind."""

    positions: str
    cos: str | None
    sin: str | None
    masks: dict[str, str]         # attention kind -> additive mask
    temperature: str | None
    past: dict[int, tuple[str, str]]   # layer -> (past key, past value) inputs; empty without a KV cache
    new_kv: list[str]                  # new keys/values of every layer, graph outputs of a KV build
    past_lengths: str | None = None    # in-place caches: each row's position [batch]
    gqa_lengths: tuple[str, str] | None = None   # genai: GroupQueryAttention's seqlens_k and total length
    chunk_bias: str | None = None      # genai: the chunked layers' attention bias


def lower(spec: ModelSpec, dtype: str = "float32", kv_cache: bool = True, kv_layout: str = "sequence-major") -> Graph:
    """The text graph: input_ids [batch, seq] -> logits [batch, seq, vocab].

    With kv_cache, the graph also reads `logits_start` (logits only from this position on) and:
    - kv_layout "sequence-major": `past_length` (absolute position of the first id, one for the batch)
      and each layer's cached keys and values ([past, batch, kv_heads, head_dim], the cached positions
      only); it returns each layer's new keys and values [seq, batch, kv_heads, head_dim].
    - kv_layout "in-place": `past_lengths` [batch] (each row's position) and each layer's cache buffer
      [batch, kv_heads, capacity, head_dim]; it returns the same buffers with the new positions written
      (`present_key.{i}`, bound to the input's memory: see ops_cache_attention).
    - kv_layout "genai": onnxruntime-genai's decoder instead (GENAI_NAMES, l4compile/ir/ops_genai.py):
      `attention_mask` [batch, total] and per-layer buffers `past_key_values.{i}.key` in, `logits` of
      each row's last token [batch, 1, vocab] and `present.{i}.key` out; no logits_start.
    """
    if kv_layout == "genai":
        return _lower_genai(spec, dtype)
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    g = Graph(spec.name, metadata={"l4compile.spec_hash": spec.content_hash()})
    ids = g.add_input("input_ids", TensorType("int64", (BATCH, SEQ)))
    past_length = logits_start = None
    in_place = kv_cache and kv_layout == "in-place"
    if kv_cache:
        past_length = g.add_input("past_lengths" if in_place else "past_length",
                                  TensorType("int64", (BATCH,) if in_place else ()))
        logits_start = g.add_input("logits_start", TensorType("int64", ()))
    x = g.op("embedding", [ids, _param(g, "embed_tokens", (spec.vocab_size, spec.hidden_size), dtype, "embedding")],
             name="embed")
    if has_image_input(spec):   # early fusion: image features replace the image tokens' embeddings
        x = fuse_image_features(g, spec, ids, x, dtype)
    shared = _shared_values(g, spec, ids, past_length, dtype, in_place)
    for layer in spec.layers:
        x = _decoder_layer(g, spec, layer, x, shared, dtype)
    x = g.op("rms_norm", [x, _param(g, "norm", (spec.hidden_size,), dtype, "norm")], name="final_norm",
             eps=spec.rms_norm_eps)
    if logits_start is not None:
        x = g.op("slice_seq", [x, logits_start], name="logits_positions")
    g.set_outputs([_lm_head(g, spec, x, dtype)] + shared.new_kv)
    return g


def _lower_genai(spec: ModelSpec, dtype: str) -> Graph:
    """The text graph onnxruntime-genai drives (see `lower`)."""
    att = spec.attention
    g = Graph(spec.name, metadata={"l4compile.spec_hash": spec.content_hash()})
    ids = g.add_input("input_ids", TensorType("int64", (BATCH, "sequence_length")))
    mask = g.add_input("attention_mask", TensorType("int64", (BATCH, "total_sequence_length")))
    past = {}
    for layer in spec.layers:
        t = TensorType(dtype, (BATCH, att.num_kv_heads, "past_sequence_length", att.head_dim))
        past[layer.index] = tuple(g.add_input(GENAI_NAMES[f"past_{kind}_names"] % layer.index, t)
                                  for kind in ("key", "value"))
    x = g.op("embedding", [ids, _param(g, "embed_tokens", (spec.vocab_size, spec.hidden_size), dtype, "embedding")],
             name="embed")
    positions = g.op("mask_positions", [ids, mask], name="positions")
    lengths = tuple(g.op("gqa_lengths", [mask], name="gqa_lengths", n_out=2))
    shared = _shared_values(g, spec, ids, None, dtype, positions=positions)
    shared.past, shared.gqa_lengths = past, lengths
    if any(layer.attention == "chunked" for layer in spec.layers):
        shared.chunk_bias = g.op("chunk_bias", [positions, mask], name="chunk_bias", chunk_size=att.chunk_size,
                                 dtype=dtype)
    for layer in spec.layers:
        x = _decoder_layer(g, spec, layer, x, shared, dtype)
    x = g.op("last_tokens", [x, lengths[0], positions], name="last_tokens")
    x = g.op("rms_norm", [x, _param(g, "norm", (spec.hidden_size,), dtype, "norm")], name="final_norm",
             eps=spec.rms_norm_eps)
    g.set_outputs([_lm_head(g, spec, x, dtype)] + shared.new_kv)
    return g


def _lm_head(g: Graph, spec: ModelSpec, x: str, dtype: str) -> str:
    name = "logits" if dtype == "float32" else "logits_low_precision"
    if spec.tie_word_embeddings:
        logits = g.op("linear", [x, "embed_tokens"], name=name, transpose_weight=True)
    else:
        logits = g.op("linear", [x, _param(g, "lm_head", (spec.hidden_size, spec.vocab_size), dtype)], name=name)
    if dtype != "float32":
        logits = g.op("cast", [logits], name="logits", dtype="float32")
    return logits


def _param(g: Graph, name: str, shape: tuple[int, ...], dtype: str, init: str = "normal") -> str:
    return g.add_param(name, TensorType(dtype, shape), init=init)


def _shared_values(g: Graph, spec: ModelSpec, ids: str, past_length: str | None, dtype: str,
                   in_place: bool = False, positions: str | None = None) -> _Shared:
    """Positions, RoPE tables, masks and temperature scales; with `positions` given (genai), no masks."""
    att = spec.attention
    layers = spec.layers
    past: dict[int, tuple[str, str]] = {}
    if past_length is not None:
        for layer in layers:
            shape = (BATCH, att.num_kv_heads, CAPACITY[layer.attention], att.head_dim) if in_place else \
                (PAST[layer.attention], BATCH, att.num_kv_heads, att.head_dim)
            t = TensorType(dtype, shape)
            past[layer.index] = (g.add_input(f"past_key.{layer.index}", t), g.add_input(f"past_value.{layer.index}", t))
    genai = positions is not None
    if positions is None:
        positions = g.op("positions", [ids] + ([past_length] if past_length else []), name="positions")
    cos = sin = None
    if any(layer.rope for layer in layers):
        freqs = g.add_const("rope.inv_freq", rope.inv_freq(att.rope, att.head_dim))
        cos, sin = g.op("rope_angles", [positions, freqs], name="rope", n_out=2)
    masks = {}
    for kind in () if in_place or genai else ("chunked", "global"):
        first = next((layer for layer in layers if layer.attention == kind), None)
        if first is None:
            continue
        keys = positions
        if past_length is not None:
            keys = g.op("key_positions", [past_length, past[first.index][0], ids], name=f"key_positions.{kind}")
        masks[kind] = g.op("attention_mask", [positions, keys], name=f"mask.{kind}",
                           chunk_size=att.chunk_size if kind == "chunked" else 0)
    temperature = None
    if any(layer.temperature_tuning for layer in layers):
        tt = att.temperature_tuning
        temperature = g.op("temperature_scale", [positions], name="temperature", attn_scale=tt.attn_scale,
                           floor_scale=tt.floor_scale)
    return _Shared(positions, cos, sin, masks, temperature, past, [], past_length if in_place else None)


def _decoder_layer(g: Graph, spec: ModelSpec, layer: LayerSpec, x: str, shared: _Shared, dtype: str) -> str:
    p = f"layers.{layer.index}"
    h = spec.hidden_size
    normed = g.op("rms_norm", [x, _param(g, f"{p}.input_layernorm", (h,), dtype, "norm")], name=f"{p}.input_norm",
                  eps=spec.rms_norm_eps)
    x = g.op("add", [x, _attention(g, spec, layer, normed, shared, dtype)], name=f"{p}.attn_residual")
    normed = g.op("rms_norm", [x, _param(g, f"{p}.post_attention_layernorm", (h,), dtype, "norm")],
                  name=f"{p}.post_attention_norm", eps=spec.rms_norm_eps)
    ffn = _moe(g, spec, p, normed, dtype) if layer.ffn == "moe" else \
        _mlp(g, f"{p}.feed_forward", normed, h, spec.dense_intermediate_size, dtype)
    return g.op("add", [x, ffn], name=f"{p}.ffn_residual")


def _attention(g: Graph, spec: ModelSpec, layer: LayerSpec, x: str, shared: _Shared, dtype: str) -> str:
    att, h = spec.attention, spec.hidden_size
    p = f"layers.{layer.index}.self_attn"

    def project(name: str, heads: int) -> str:
        w = _param(g, f"{p}.{name}_proj", (h, heads * att.head_dim), dtype)
        flat = g.op("linear", [x, w], name=f"{p}.{name}")
        return g.op("split_heads", [flat], name=f"{p}.{name}_heads", num_heads=heads, head_dim=att.head_dim)

    q, k, v = project("q", att.num_heads), project("k", att.num_kv_heads), project("v", att.num_kv_heads)
    if layer.rope:
        q = g.op("rope", [q, shared.cos, shared.sin], name=f"{p}.q_rope")
        k = g.op("rope", [k, shared.cos, shared.sin], name=f"{p}.k_rope")
    if layer.qk_norm:
        q = g.op("l2_norm", [q], name=f"{p}.q_norm", eps=spec.rms_norm_eps)
        k = g.op("l2_norm", [k], name=f"{p}.k_norm", eps=spec.rms_norm_eps)
    if layer.temperature_tuning:
        q = g.op("mul", [q, shared.temperature], name=f"{p}.q_temperature")
    if shared.gqa_lengths is not None:
        out = _genai_attention(g, spec, layer, q, k, v, shared)
    elif shared.past_lengths is not None:
        out = _cache_attention(g, spec, layer, q, k, v, shared)
    else:
        out = _masked_attention(g, spec, layer, q, k, v, shared)
    w_o = _param(g, f"{p}.o_proj", (att.num_heads * att.head_dim, h), dtype)
    return g.op("linear", [out, w_o], name=f"{p}.o")


def _masked_attention(g: Graph, spec: ModelSpec, layer: LayerSpec, q: str, k: str, v: str, shared: _Shared) -> str:
    """Attention through an explicit mask over the cached positions (sequence-major) and the new ones."""
    p = f"layers.{layer.index}.self_attn"
    if layer.index in shared.past:
        for kind, new in (("key", k), ("value", v)):
            shared.new_kv.append(g.op("transpose", [new], name=f"new_{kind}.{layer.index}", perm=(1, 0, 2, 3)))
        past_key, past_value = shared.past[layer.index]
        k = g.op("kv_concat", [past_key, k], name=f"{p}.keys")
        v = g.op("kv_concat", [past_value, v], name=f"{p}.values")
    mask = shared.masks[layer.attention]
    return g.op("attention", [q, k, v, mask], name=f"{p}.attention", scale=spec.attention.head_dim ** -0.5)


def _cache_attention(g: Graph, spec: ModelSpec, layer: LayerSpec, q: str, k: str, v: str, shared: _Shared) -> str:
    """Attention over the layer's in-place cache buffer, which returns with the new positions written."""
    p, i, att = f"layers.{layer.index}.self_attn", layer.index, spec.attention
    past_key, past_value = shared.past[i]
    out, *present = g.op("cache_attention", [q, k, v, past_key, past_value, shared.past_lengths],
                         name=f"{p}.cache_attention",
                         outputs=[f"{p}.attention", f"present_key.{i}", f"present_value.{i}"],
                         scale=att.head_dim ** -0.5, chunk_size=att.chunk_size if layer.attention == "chunked" else 0)
    shared.new_kv.extend(present)
    return out


def _genai_attention(g: Graph, spec: ModelSpec, layer: LayerSpec, q: str, k: str, v: str, shared: _Shared) -> str:
    """Attention over genai's KV buffer of the layer (every position; chunked layers masked to their chunk)."""
    p, i = f"layers.{layer.index}.self_attn", layer.index
    bias = [shared.chunk_bias] if layer.attention == "chunked" else []
    out, *present = g.op("genai_attention", [q, k, v, *shared.past[i], *shared.gqa_lengths, *bias],
                         name=f"{p}.genai_attention",
                         outputs=[f"{p}.attention"] + [GENAI_NAMES[f"present_{kind}_names"] % i
                                                       for kind in ("key", "value")],
                         scale=spec.attention.head_dim ** -0.5)
    shared.new_kv.extend(present)
    return out


def _mlp(g: Graph, p: str, x: str, hidden: int, inner: int, dtype: str) -> str:
    gate = g.op("linear", [x, _param(g, f"{p}.gate_proj", (hidden, inner), dtype)], name=f"{p}.gate")
    up = g.op("linear", [x, _param(g, f"{p}.up_proj", (hidden, inner), dtype)], name=f"{p}.up")
    act = g.op("silu_mul", [gate, up], name=f"{p}.act")
    return g.op("linear", [act, _param(g, f"{p}.down_proj", (inner, hidden), dtype)], name=f"{p}.down")


def _moe(g: Graph, spec: ModelSpec, p: str, x: str, dtype: str) -> str:
    moe, h = spec.moe, spec.hidden_size
    p = f"{p}.feed_forward"
    logits = g.op("linear", [x, _param(g, f"{p}.router", (h, moe.num_experts), dtype, "router")], name=f"{p}.router")
    scores = g.op("router_scores", [logits], name=f"{p}.scores", top_k=moe.top_k)
    gate_up = _param(g, f"{p}.experts.gate_up_proj", (moe.num_experts, h, 2 * moe.intermediate_size), dtype)
    down = _param(g, f"{p}.experts.down_proj", (moe.num_experts, moe.intermediate_size, h), dtype)
    routed = g.op("moe_experts", [x, scores, gate_up, down], name=f"{p}.experts")
    if not moe.shared_expert:
        return routed
    shared = _mlp(g, f"{p}.shared_expert", x, h, moe.intermediate_size, dtype)
    return g.op("add", [shared, routed], name=f"{p}.combine")
