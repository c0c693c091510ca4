"""Parameter accounting of a spec, exactly as transformers builds the model.

Text: `Llama4ForCausalLM` (embedding, per-layer attention / dense MLP / MoE with a
router, stacked experts and a shared expert, two RMSNorms per layer, final norm,
untied lm_head). Vision: `Llama4VisionModel` + `Llama4MultiModalProjector`.
Pure arithmetic: no weights, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.spec.model import LayerSpec, ModelSpec, VisionSpec

BREAKDOWN_KEYS = ("embedding", "lm_head", "attention", "dense_ffn", "moe_routed", "moe_shared",
                  "router", "norms", "vision")


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer, by part."""

    attention: int
    dense_ffn: int
    moe_routed: int   # all routed experts of the layer
    moe_shared: int
    router: int
    norms: int

    @property
    def total(self) -> int:
        return (self.attention + self.dense_ffn + self.moe_routed + self.moe_shared
                + self.router + self.norms)


def swiglu_params(hidden: int, intermediate: int) -> int:
    """gate, up and down projections, no bias."""
    return 3 * hidden * intermediate


def attention_params(spec: ModelSpec) -> int:
    """q, k, v, o projections without bias (qk norm has no weight)."""
    a = spec.attention
    q_and_o = 2 * spec.hidden_size * a.num_heads * a.head_dim
    k_and_v = 2 * spec.hidden_size * a.num_kv_heads * a.head_dim
    return q_and_o + k_and_v


def expert_params(spec: ModelSpec) -> int:
    """One routed expert (a slice of gate_up_proj [E, hidden, 2F] and down_proj [E, F, hidden])."""
    return swiglu_params(spec.hidden_size, spec.moe.intermediate_size) if spec.moe else 0


def layer_params(spec: ModelSpec, layer: LayerSpec) -> LayerParams:
    dense = routed = shared = router = 0
    if layer.ffn == "moe":
        routed = spec.moe.num_experts * expert_params(spec)
        shared = expert_params(spec) if spec.moe.shared_expert else 0
        router = spec.hidden_size * spec.moe.num_experts
    else:
        dense = swiglu_params(spec.hidden_size, spec.dense_intermediate_size)
    return LayerParams(attention=attention_params(spec), dense_ffn=dense, moe_routed=routed,
                       moe_shared=shared, router=router, norms=2 * spec.hidden_size)


def vision_params(vision: VisionSpec, text_hidden_size: int) -> int:
    """Llama4VisionModel (patch embedding, class and positional embeddings, pre/post
    LayerNorm, biased ViT layers, pixel-shuffle adapter MLP) + the projector linear."""
    v = vision
    hidden, inter = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    embeddings = v.num_channels * v.patch_size ** 2 * hidden + hidden + (patches + 1) * hidden
    layernorms = 2 * 2 * hidden                      # weight and bias, pre and post
    encoder_layer = (4 * (hidden * hidden + hidden)  # q, k, v, o with bias
                     + hidden * inter + inter + inter * hidden + hidden  # fc1, fc2 with bias
                     + 2 * 2 * hidden)               # two LayerNorms
    adapter = inter * v.projector_input_dim + v.projector_output_dim ** 2  # no bias
    projector = v.vision_output_dim * text_hidden_size
    return embeddings + layernorms + v.num_layers * encoder_layer + adapter + projector


def params_breakdown(spec: ModelSpec) -> dict[str, int]:
    """Total parameters by part (keys BREAKDOWN_KEYS); their sum is the model's numel."""
    out = dict.fromkeys(BREAKDOWN_KEYS, 0)
    out["embedding"] = spec.vocab_size * spec.hidden_size
    out["lm_head"] = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size
    out["norms"] = spec.hidden_size  # the final norm
    for layer in spec.layers:
        counts = layer_params(spec, layer)
        for key in ("attention", "dense_ffn", "moe_routed", "moe_shared", "router", "norms"):
            out[key] += getattr(counts, key)
    if spec.vision is not None:
        out["vision"] = vision_params(spec.vision, spec.hidden_size)
    return out


def active_params(spec: ModelSpec) -> int:
    """Parameters one text token touches: every text parameter except the routed
    experts it is not sent to (top_k of num_experts per MoE layer). No vision."""
    parts = params_breakdown(spec)
    active = sum(parts.values()) - parts["vision"] - parts["moe_routed"]
    return active + len(spec.moe_layers) * (spec.moe.top_k if spec.moe else 0) * expert_params(spec)


def active_matmul_params(spec: ModelSpec) -> int:
    """Active parameters used in matrix products: not the norms, nor the embedding
    lookup (unless it is tied to lm_head, whose matmul then uses it)."""
    parts = params_breakdown(spec)
    lookup = 0 if spec.tie_word_embeddings else parts["embedding"]
    return active_params(spec) - lookup - parts["norms"]
