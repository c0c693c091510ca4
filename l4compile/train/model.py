"""The training model: plain torch, built from a spec, computing exactly the reference's function, fast.

Parameter names and layouts are the Hugging Face text model's (`model.layers.0.self_attn.q_proj.weight`
[out, in], `...feed_forward.experts.gate_up_proj` [E, H, 2F], `lm_head.weight`), so a checkpoint maps
1:1 both ways. Where the reference (`GraphModule` over the lowered IR) is obviously correct, this is fast:

- MoE by dispatch: tokens sorted by their routed expert, one matmul pair per expert over its tokens only;
  routed output = expert_e(x * sigmoid(top logit)) (Llama 4 scales the expert's input), plus the shared
  expert. Unselected experts contribute exactly 0 in the reference, with 0 gradient: skipping them is exact.
- Chunked attention by chunks: the sequence is cut into chunks of `chunk_size` and each chunk runs causal
  SDPA on its own (block-diagonal attention, O(seq * chunk)); no [seq, seq] mask exists for those layers.
- Global (NoPE) layers: causal SDPA, queries scaled per position by the temperature of `temperature_scale`.

Parallelism, activation checkpointing and compilation are applied from outside (`l4compile.train.parallel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from l4compile import rope
from l4compile.spec.model import LayerSpec, ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm(x, self.eps) * self.weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last axis, in float32 (Llama 4's weightless qk norm, RMSNorm's core)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding. x [B, S, n, d]; cos/sin [S, d/2] (float32)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Causal attention within chunks of `chunk` positions. q [B, Hq, S, D], k/v [B, Hkv, S, D].

    The sequence is padded at its end to whole chunks (padded keys lie after every real query, so causality
    hides them) and the chunks become batch rows of one SDPA call."""
    b, _, s, d = q.shape
    if s <= chunk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    n = -(-s // chunk)
    pad = n * chunk - s

    def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B * n, H, chunk, D]
        t = F.pad(t, (0, 0, 0, pad)) if pad else t
        return t.unflatten(2, (n, chunk)).transpose(1, 2).flatten(0, 1)

    out = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), is_causal=True, enable_gqa=True)
    out = out.unflatten(0, (b, n)).transpose(1, 2).flatten(2, 3)
    return out[:, :, :s] if pad else out


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec) -> None:
        super().__init__()
        att, h = spec.attention, spec.hidden_size
        self.heads, self.kv_heads, self.head_dim = att.num_heads, att.num_kv_heads, att.head_dim
        self.layer = layer
        self.eps = spec.rms_norm_eps
        self.chunk = att.chunk_size
        self.q_proj = nn.Linear(h, att.num_heads * att.head_dim, bias=False)
        self.k_proj = nn.Linear(h, att.num_kv_heads * att.head_dim, bias=False)
        self.v_proj = nn.Linear(h, att.num_kv_heads * att.head_dim, bias=False)
        self.o_proj = nn.Linear(att.num_heads * att.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                temperature: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        if self.layer.rope:
            q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
        if self.layer.qk_norm:
            q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
        if self.layer.temperature_tuning:
            q = (q * temperature).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.layer.attention == "chunked":
            out = chunked_causal_attention(q, k, v, self.chunk)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Stacked expert weights in the HF layout: gate_up_proj [E, H, 2F] (gate then up), down_proj [E, F, H]."""

    def __init__(self, experts: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(experts, hidden, 2 * inner))
        self.down_proj = nn.Parameter(torch.zeros(experts, inner, hidden))

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """tokens [N, H] sorted by expert, `counts[e]` of them for expert e -> [N, H]."""
        # unbind, not [e]: indexing per expert would make each backward write a zero-filled [E, ...] gradient
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs = []
        for e, part in enumerate(tokens.split(counts)):
            if part.shape[0] == 0:
                continue
            gate, up = (part @ gate_up[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ down[e])
        return torch.cat(outs) if outs else tokens[:0]


class MoE(nn.Module):
    """Llama 4 MoE by dispatch: shared_expert(x) + sum over the top-k e of expert_e(x * sigmoid(logit_e))."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        moe, h = spec.moe, spec.hidden_size
        self.top_k, self.num_experts = moe.top_k, moe.num_experts
        self.router = nn.Linear(h, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, h, moe.intermediate_size)
        self.shared_expert = MLP(h, moe.intermediate_size) if moe.shared_expert else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (output [B, S, H], router logits [B * S, E]: not a view, which FSDP2 warns about)."""
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        top_logit, expert = torch.topk(logits, self.top_k, dim=-1)            # [T, k]
        score = torch.sigmoid(top_logit.float()).to(tokens.dtype)
        order = torch.argsort(expert.reshape(-1), stable=True)                 # routed copies grouped by expert
        token_of = order // self.top_k
        counts = torch.bincount(expert.reshape(-1), minlength=self.num_experts).tolist()
        routed_in = tokens[token_of] * score.reshape(-1, 1)[order]
        routed = self.experts(routed_in, counts)
        out = torch.zeros_like(tokens).index_add(0, token_of, routed.to(tokens.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(x.shape), logits


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec) -> None:
        super().__init__()
        self.is_moe = layer.ffn == "moe"
        self.self_attn = Attention(spec, layer)
        self.feed_forward = MoE(spec) if self.is_moe else MLP(spec.hidden_size, spec.dense_intermediate_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                temperature: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), rotary, temperature)
        ffn = self.feed_forward(self.post_attention_layernorm(x))
        ffn, router_logits = ffn if self.is_moe else (ffn, None)
        return x + ffn, router_logits


class TextModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        # padding_idx as transformers sets it: the pad token's embedding gets no gradient
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, padding_idx=spec.tokens.pad)
        self.layers = nn.ModuleList(DecoderLayer(spec, layer) for layer in spec.layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class Llama4ForTraining(nn.Module):
    """`forward(input_ids [B, S]) -> (logits [B, S, V] float32, router logits of each MoE layer [B * S, E])`.

    Positions start at 0 for every row (packed training sequences)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = TextModel(spec)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        att = spec.attention
        self.register_buffer("inv_freq", torch.from_numpy(rope.inv_freq(att.rope, att.head_dim)), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq.float()
        rotary = (torch.cos(angles), torch.sin(angles))
        temperature = None
        tt = self.spec.attention.temperature_tuning
        if tt is not None:
            temperature = (torch.log1p(torch.floor((positions + 1.0) / tt.floor_scale)) * tt.attn_scale + 1.0)
            temperature = temperature[:, None, None]                   # [S, 1, 1] over [B, S, heads, D]
        x = self.model.embed_tokens(input_ids)
        router_logits = []
        for layer in self.model.layers:
            x, logits = layer(x, rotary, temperature)
            if logits is not None:
                router_logits.append(logits)
        x = self.model.norm(x)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight).float(), router_logits
