"""Attention over an in-place KV cache with per-row lengths (onnxruntime's GroupQueryAttention).

The cache of a layer is one preallocated buffer per batch row, batch-major [batch, kv_heads,
capacity, head_dim]: the model reads each row's cached positions where they lie and writes the new
keys and values right after them, in the same buffer (onnxruntime shares past and present when the
runtime binds both to the same memory). Nothing of the history is copied or transposed per step.

`past_lengths` [batch] holds each row's absolute position of its first new token, so the rows of a
batch may stand at different positions (ragged batches, continuous batching). A global layer's
buffer holds the whole history (row b has past_lengths[b] cached positions); a chunked layer's
buffer holds only the current chunk (past_lengths[b] % chunk cached positions) and restarts at
each chunk boundary, so plain causal attention over it is exactly chunked attention, provided a
step's new tokens lie in one chunk. onnxruntime also takes several new tokens after cached ones for
batch 1 only. The runtime splits longer steps at chunk boundaries and runs multi-token steps of a
batch row by row (runtime/kv_cache.py, ort_backend.py); the torch implementation computes the exact
semantics for any step.
"""

from __future__ import annotations

from l4compile.ir.op import Op, expect, get_op, register
from l4compile.ir.types import TensorType

MS_DOMAIN = "com.microsoft"


@register
class CacheAttention(Op):
    """q [B, S, Hq, D], new k/v [B, S, Hkv, D], cache k/v [B, Hkv, C, D], past_lengths int64 [B] ->
    out [B, S, Hq*D] and the cache k/v with the new positions written (the same buffers in place).

    Attributes: scale, chunk_size (> 0: a chunked layer whose buffer holds the current chunk; 0: global).
    Softmax(q k^T * scale) v over each row's cached positions and the new ones, causal, each KV head
    serving Hq/Hkv consecutive query heads.
    """

    name = "cache_attention"

    def infer(self, inputs, attrs):
        q, k, v, cache_k, cache_v, past_lengths = inputs
        expect(q.rank == k.rank == v.rank == cache_k.rank == 4, self.name, "q, k, v and the cache must be rank 4")
        expect(k.shape[2] == cache_k.shape[1] and k.shape[3] == cache_k.shape[3] == q.shape[3], self.name,
               f"new keys {k} do not match the cache {cache_k}")
        expect(isinstance(q.shape[2], int) and q.shape[2] % k.shape[2] == 0, self.name,
               f"{q.shape[2]} query heads do not group over {k.shape[2]} KV heads")
        expect(past_lengths.dtype == "int64" and past_lengths.rank == 1, self.name, f"past_lengths {past_lengths}")
        return [q.with_shape((q.shape[0], q.shape[1], q.shape[2] * q.shape[3])), cache_k, cache_v]

    def torch(self, torch, inputs, attrs):
        q, k, v, cache_k, cache_v, past_lengths = inputs
        chunk, seq = attrs["chunk_size"], q.shape[1]
        cache_k, cache_v = cache_k.clone(), cache_v.clone()
        outs = []
        for b in range(q.shape[0]):
            start = int(past_lengths[b])
            cached = start % chunk if chunk else start
            keys = torch.cat([cache_k[b, :, :cached].transpose(0, 1), k[b]], dim=0)[None]   # [1, T, Hkv, D]
            values = torch.cat([cache_v[b, :, :cached].transpose(0, 1), v[b]], dim=0)[None]
            q_pos = torch.arange(start, start + seq)[None]
            k_pos = torch.arange(start - cached, start + seq)[None]
            (mask,) = get_op("attention_mask").torch(torch, [q_pos, k_pos], {"chunk_size": chunk})
            (out,) = get_op("attention").torch(torch, [q[b:b + 1], keys, values, mask], {"scale": attrs["scale"]})
            outs.append(out)
            kept = min(seq, cache_k.shape[2] - cached)   # new positions that fit (the runtime makes them all fit)
            cache_k[b, :, cached:cached + kept] = k[b, :kept].transpose(0, 1)
            cache_v[b, :, cached:cached + kept] = v[b, :kept].transpose(0, 1)
        return [torch.cat(outs, dim=0), cache_k, cache_v]

    def onnx(self, b, inputs, attrs, types):
        q, k, v, cache_k, cache_v, past_lengths = inputs
        tq, tk = types[0], types[1]
        hq, hkv = tq.shape[2], tk.shape[2]
        cached = past_lengths
        if attrs["chunk_size"]:
            cached = b.node("Mod", [past_lengths, b.const(attrs["chunk_size"], "int64")])
        # GroupQueryAttention reads seqlens_k = cached + new - 1 per row (int32) and the longest total length.
        new = b.node("Gather", [b.node("Shape", [q]), b.const(1, "int64")], axis=0)
        seqlens = b.node("Cast", [b.node("Sub", [b.node("Add", [cached, new]), b.const(1, "int64")])], to=6)
        total = b.node("Add", [b.node("ReduceMax", [seqlens], keepdims=0), b.const(1, "int32")])
        flat = [b.node("Reshape", [x, b.int64s(0, 0, -1)]) for x in (q, k, v)]
        out, present_k, present_v = b.node("GroupQueryAttention", flat + [cache_k, cache_v, seqlens, total], n_out=3,
                                           domain=MS_DOMAIN, num_heads=hq, kv_num_heads=hkv,
                                           scale=float(attrs["scale"]))
        return [out, present_k, present_v]
