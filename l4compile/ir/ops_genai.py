"""Ops of the onnxruntime-genai decoder: what its inputs (attention_mask, shared KV buffers) mean.

onnxruntime-genai drives a decoder with `input_ids` [B, S], `attention_mask` [B, T] (T: the total
length so far; a batch of prompts is right-padded, padding 0 in the mask) and one KV buffer per
layer, `past_key_values.%d.key` [B, kv_heads, P, head_dim], that it binds to `present.%d.key` too
(past_present_share_buffer: P is the generation's max_length). onnxruntime's GroupQueryAttention
reads the mask as genai's model builder feeds it: seqlens_k = sum(mask) - 1 per row, the total
length T, and it keeps row b's positions in slots [0, seqlens_k + 1) of its buffer (slot = position).
A step with S == T is a first prompt (right padding: row b's real tokens are the first sum(mask));
any other step continues after each row's cached positions.

Chunked (RoPE) layers attend within their chunk: the buffer holds every position (genai gives every
layer the full history), so `chunk_bias` masks the keys of other chunks through GroupQueryAttention's
attention_bias input.
"""

from __future__ import annotations

import numpy as np

from l4compile.ir.op import ONNX_DTYPES, Op, expect, get_op, register
from l4compile.ir.ops_cache_attention import MS_DOMAIN
from l4compile.ir.ops_core import heads_view
from l4compile.ir.types import TensorType


def _first_prompt_base(torch, ids, mask):
    """Each row's position of its first new token: 0 on a first prompt (S == T), else sum(mask) - S."""
    seq, total = ids.shape[1], mask.shape[1]
    if seq == total:
        return torch.zeros(ids.shape[0], dtype=torch.int64)
    return mask.sum(dim=1).to(torch.int64) - seq


@register
class MaskPositions(Op):
    """Absolute positions [B, S] of the new tokens from genai's attention_mask [B, T] (see module doc)."""

    name = "mask_positions"

    def infer(self, inputs, attrs):
        ids, mask = inputs
        expect(mask.rank == 2, self.name, f"attention_mask {mask} must be [batch, total]")
        return [TensorType("int64", ids.shape)]

    def torch(self, torch, inputs, attrs):
        ids, mask = inputs
        return [_first_prompt_base(torch, ids, mask)[:, None] + torch.arange(ids.shape[1])[None]]

    def onnx(self, b, inputs, attrs, types):
        ids, mask = inputs
        seq = b.node("Gather", [b.node("Shape", [ids]), b.const(1, "int64")], axis=0)
        total = b.node("Gather", [b.node("Shape", [mask]), b.const(1, "int64")], axis=0)
        mask64 = mask if types[1].dtype == "int64" else b.node("Cast", [mask], to=7)
        ones = b.node("ReduceSum", [mask64, b.int64s(1)], keepdims=1)                         # [B, 1]
        base = b.node("Where", [b.node("Equal", [seq, total]), b.const(0, "int64"), b.node("Sub", [ones, seq])])
        offsets = b.node("Unsqueeze", [b.node("Range", [b.const(0, "int64"), seq, b.const(1, "int64")]), b.int64s(0)])
        return [b.node("Add", [base, offsets])]


@register
class GqaLengths(Op):
    """GroupQueryAttention's lengths from attention_mask [B, T]: seqlens_k int32 [B] = sum(mask) - 1, and
    total_sequence_length int32 [] = T."""

    name = "gqa_lengths"

    def infer(self, inputs, attrs):
        (mask,) = inputs
        return [TensorType("int32", (mask.shape[0],)), TensorType("int32", ())]

    def torch(self, torch, inputs, attrs):
        (mask,) = inputs
        return [(mask.sum(dim=1) - 1).to(torch.int32), torch.tensor(mask.shape[1], dtype=torch.int32)]

    def onnx(self, b, inputs, attrs, types):
        (mask,) = inputs
        ones = b.node("ReduceSum", [mask, b.int64s(1)], keepdims=0)
        seqlens = b.node("Cast", [b.node("Sub", [ones, b.const(1, types[0].dtype)])], to=6)
        total = b.node("Cast", [b.node("Gather", [b.node("Shape", [mask]), b.const(1, "int64")], axis=0)], to=6)
        return [seqlens, total]


@register
class ChunkBias(Op):
    """Additive bias [B, 1, S, T] of a chunked layer over genai's KV slots: 0 where key slot t (position t)
    lies in the chunk of the query's position, the dtype's lowest value elsewhere (causality and each row's
    length are GroupQueryAttention's). Attributes: chunk_size, dtype (the attention's)."""

    name = "chunk_bias"

    def infer(self, inputs, attrs):
        pos, mask = inputs
        return [TensorType(attrs["dtype"], (pos.shape[0], 1, pos.shape[1], mask.shape[1]))]

    def torch(self, torch, inputs, attrs):
        pos, mask = inputs
        chunk = attrs["chunk_size"]
        keys = torch.arange(mask.shape[1])[None, None, None, :]
        same = torch.div(keys, chunk, rounding_mode="floor") == torch.div(pos[:, None, :, None], chunk,
                                                                           rounding_mode="floor")
        dtype = getattr(torch, attrs["dtype"])
        return [torch.where(same, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))]

    def onnx(self, b, inputs, attrs, types):
        pos, mask = inputs
        c = b.const(attrs["chunk_size"], "int64")   # positions are >= 0: Div truncates as floor division
        total = b.node("Gather", [b.node("Shape", [mask]), b.const(1, "int64")], axis=0)
        keys = b.node("Div", [b.node("Range", [b.const(0, "int64"), total, b.const(1, "int64")]), c])   # [T]
        query = b.node("Unsqueeze", [b.node("Div", [pos, c]), b.int64s(1, 3)])                        # [B, 1, S, 1]
        low = np.finfo(attrs["dtype"]).min
        return [b.node("Where", [b.node("Equal", [query, keys]), b.scalar(0.0, attrs["dtype"]),
                                 b.scalar(low, attrs["dtype"])])]


@register
class GenaiAttention(Op):
    """q [B, S, Hq, D], new k/v [B, S, Hkv, D] (or heads flat, [B, S, H*D]), buffers k/v [B, Hkv, P, D],
    seqlens_k int32 [B], total int32 [], optional bias [B, 1, S, T] -> out [B, S, Hq*D] and the buffers with the new positions written
    (onnxruntime's GroupQueryAttention as genai drives it; present has max(P, T) slots).

    Row b holds seqlens_k[b] + 1 positions after this step, in slots [0, seqlens_k[b] + 1); the new ones
    start at slot 0 on a first prompt (S == T), else at seqlens_k[b] + 1 - S. Attention is causal over them,
    plus the bias; each KV head serves Hq/Hkv consecutive query heads. Attribute: scale.
    """

    name = "genai_attention"

    def infer(self, inputs, attrs):
        q, k, v, cache_k, cache_v, seqlens, total = inputs[:7]
        expect(cache_k.rank == 4, self.name, "the buffers must be rank 4")
        q, k, v = (heads_view(t, cache_k.shape[3], self.name) for t in (q, k, v))
        expect(k.shape[2] == cache_k.shape[1] and k.shape[3] == cache_k.shape[3] == q.shape[3], self.name,
               f"new keys {k} do not match the buffer {cache_k}")
        expect(isinstance(q.shape[2], int) and q.shape[2] % k.shape[2] == 0, self.name,
               f"{q.shape[2]} query heads do not group over {k.shape[2]} KV heads")
        expect(seqlens.dtype == "int32" and total.dtype == "int32", self.name, "seqlens_k and total must be int32")
        present = cache_k.with_shape(cache_k.shape[:2] + ("present_sequence_length",) + cache_k.shape[3:])
        return [q.with_shape((q.shape[0], q.shape[1], q.shape[2] * q.shape[3])), present, present]

    def torch(self, torch, inputs, attrs):
        q, k, v, cache_k, cache_v, seqlens, total = inputs[:7]
        bias = inputs[7] if len(inputs) > 7 else None
        q, k, v = (x.reshape(*x.shape[:2], -1, cache_k.shape[3]) for x in (q, k, v))
        batch, seq = q.shape[:2]
        first = seq == int(total)
        slots = max(cache_k.shape[2], int(total))
        present = []
        for cache in (cache_k, cache_v):
            buffer = torch.zeros(cache.shape[:2] + (slots,) + cache.shape[3:], dtype=cache.dtype)
            buffer[:, :, :cache.shape[2]] = cache
            present.append(buffer)
        outs = []
        for b in range(batch):
            length = int(seqlens[b]) + 1
            past = 0 if first else length - seq
            keys = torch.cat([present[0][b, :, :past].transpose(0, 1), k[b]], dim=0)[None]    # [1, past+S, Hkv, D]
            values = torch.cat([present[1][b, :, :past].transpose(0, 1), v[b]], dim=0)[None]
            q_pos = torch.arange(past, past + seq)[:, None]
            k_pos = torch.arange(past + seq)[None, :]
            allowed = (k_pos <= q_pos) & (k_pos < length)
            mask = torch.where(allowed, 0.0, -float("inf"))[None, None]
            if bias is not None:
                mask = mask + bias[b:b + 1, :, :, :past + seq].float()
            (out,) = get_op("attention").torch(torch, [q[b:b + 1], keys, values, mask], {"scale": attrs["scale"]})
            outs.append(out)
            present[0][b, :, past:past + seq] = k[b].transpose(0, 1)
            present[1][b, :, past:past + seq] = v[b].transpose(0, 1)
        return [torch.cat(outs, dim=0)] + present

    def onnx(self, b, inputs, attrs, types):
        q, k, v, cache_k, cache_v, seqlens, total = inputs[:7]
        bias = list(inputs[7:8])
        tq, tk = (heads_view(t, types[3].shape[3], self.name) for t in types[:2])
        flat = [x if t.rank == 3 else b.node("Reshape", [x, b.int64s(0, 0, -1)]) for x, t in zip((q, k, v), types)]
        optional = ["", "", ""] + bias if bias else []   # cos_cache, sin_cache, position_ids, attention_bias
        out, present_k, present_v = b.node("GroupQueryAttention", flat + [cache_k, cache_v, seqlens, total] + optional,
                                           n_out=3, domain=MS_DOMAIN, num_heads=tq.shape[2],
                                           kv_num_heads=tk.shape[2], scale=float(attrs["scale"]))
        return [out, present_k, present_v]


@register
class LastTokens(Op):
    """x [B, S, H] -> [B, 1, H]: each row's last real token of the step (genai reads the logits of these
    only): position seqlens_k[b] - positions[b, 0] of the step (right padding on a first prompt)."""

    name = "last_tokens"

    def infer(self, inputs, attrs):
        x, seqlens, positions = inputs
        return [x.with_shape((x.shape[0], 1, x.shape[2]))]

    def torch(self, torch, inputs, attrs):
        x, seqlens, positions = inputs
        index = seqlens.to(torch.int64) - positions[:, 0]
        return [x[torch.arange(x.shape[0]), index][:, None]]

    def onnx(self, b, inputs, attrs, types):
        x, seqlens, positions = inputs
        first = b.node("Gather", [positions, b.const(0, "int64")], axis=1)                   # [B]
        index = b.node("Sub", [b.node("Cast", [seqlens], to=ONNX_DTYPES["int64"]), first])
        index = b.node("Unsqueeze", [index, b.int64s(1, 2)])                                 # [B, 1, 1]
        hidden = b.node("Gather", [b.node("Shape", [x]), b.const(2, "int64")], axis=0)
        shape = b.node("Concat", [b.int64s(1, 1), b.node("Unsqueeze", [hidden, b.int64s(0)])], axis=0)
        return [b.node("GatherElements", [x, b.node("Expand", [index, shape])], axis=1)]
