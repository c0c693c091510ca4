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

import numpy as np
import onnx

from l4compile.ir.op import ONNX_DTYPES, Op, expect, get_op, register
from l4compile.ir.ops_core import heads_view
from l4compile.ir.types import TensorType

MS_DOMAIN = "com.microsoft"


@register
class CacheAttention(Op):
    """q [B, S, Hq, D], new k/v [B, S, Hkv, D], cache k/v [B, Hkv, C, D], past_lengths int64 [B] ->
    out [B, S, Hq*D] and the cache k/v with the new positions written (the same buffers in place).

    q, k and v may also come with their heads flat, [B, S, H*D] (passes/flat_heads.py), and the layer's
    step's lengths computed once for all layers of its kind by `cache_lengths` (seqlens_k, total and
    whether to attend by matmuls as three more inputs; passes/attention_lengths.py); the torch form reads
    past_lengths either way.

    Attributes: scale, chunk_size (> 0: a chunked layer whose buffer holds the current chunk; 0: global).
    Softmax(q k^T * scale) v over each row's cached positions and the new ones, causal, each KV head
    serving Hq/Hkv consecutive query heads.
    """

    name = "cache_attention"

    def infer(self, inputs, attrs):
        q, k, v, cache_k, cache_v, past_lengths = inputs[:6]
        expect(cache_k.rank == 4, self.name, "the cache must be rank 4")
        q, k, v = (heads_view(t, cache_k.shape[3], self.name) for t in (q, k, v))
        expect(k.shape[2] == cache_k.shape[1] and k.shape[3] == cache_k.shape[3] == q.shape[3], self.name,
               f"new keys {k} do not match the cache {cache_k}")
        expect(isinstance(q.shape[2], int) and q.shape[2] % k.shape[2] == 0, self.name,
               f"{q.shape[2]} query heads do not group over {k.shape[2]} KV heads")
        expect(past_lengths.dtype == "int64" and past_lengths.rank == 1, self.name, f"past_lengths {past_lengths}")
        expect(len(inputs) in (6, 9), self.name, "expected past_lengths, or past_lengths and cache_lengths' three")
        if len(inputs) == 9:
            expect(inputs[6].dtype == inputs[7].dtype == "int32" and inputs[8].dtype == "bool", self.name,
                   "seqlens_k and total must be int32, the matmul choice bool")
        return [q.with_shape((q.shape[0], q.shape[1], q.shape[2] * q.shape[3])), cache_k, cache_v]

    def torch(self, torch, inputs, attrs):
        q, k, v, cache_k, cache_v, past_lengths = inputs[:6]
        q, k, v = (x.reshape(*x.shape[:2], -1, cache_k.shape[3]) for x in (q, k, v))
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
        q, k, v, cache_k, cache_v, past_lengths = inputs[:6]
        tq, tk = (heads_view(t, types[3].shape[3], self.name) for t in types[:2])
        hq, hkv, chunk = tq.shape[2], tk.shape[2], attrs["chunk_size"]
        if len(inputs) == 9:
            seqlens, total, by_matmuls = inputs[6:9]
        else:
            seqlens, total, by_matmuls = _step_lengths(b, past_lengths, q, cache_k, chunk, hq // hkv)
        flat = [x if t.rank == 3 else b.node("Reshape", [x, b.int64s(0, 0, -1)]) for x, t in zip((q, k, v), types)]
        gqa = dict(domain=MS_DOMAIN, num_heads=hq, kv_num_heads=hkv, scale=float(attrs["scale"]))
        if tq.dtype != "float32":
            return b.node("GroupQueryAttention", flat + [cache_k, cache_v, seqlens, total], n_out=3, **gqa)
        # A decode step (one new token per row) over a long history: onnxruntime's GroupQueryAttention
        # reads a KV head's cached keys and values once per query head it serves (Hq/Hkv times per
        # step), so past a point it is cheaper to read the whole buffer once per KV head with matmuls
        # (`_decode_by_matmuls`). Both branches write the new position into the same buffers in place.
        with b.capture() as by_gqa:
            gqa_outs = b.node("GroupQueryAttention", flat + [cache_k, cache_v, seqlens, total], n_out=3, **gqa)
        with b.capture() as by_mm:
            cached = b.node("Mod", [past_lengths, b.const(chunk, "int64")]) if chunk else past_lengths
            mm_outs = _decode_by_matmuls(b, q, k, v, cache_k, cache_v, cached, hq, hkv, tq.shape[3], float(attrs["scale"]))
        elem = ONNX_DTYPES[tq.dtype]
        branches = [onnx.helper.make_graph(nodes, b.fresh(name), [],
                                           [onnx.helper.make_tensor_value_info(o, elem, None) for o in outs])
                    for nodes, outs, name in ((by_mm, mm_outs, "decode_by_matmuls"), (by_gqa, gqa_outs, "gqa"))]
        return b.node("If", [by_matmuls], n_out=3, then_branch=branches[0], else_branch=branches[1])


# Reading the buffer with matmuls costs about this many times more per position than
# GroupQueryAttention's per-head reads (measured on CPU: MLAS's small-M kernels are slower per byte);
# the matmuls run when capacity * MATMUL_READ_COST <= (longest row + 1) * query heads per KV head.
MATMUL_READ_COST = 2
# ... and only past this many cached positions: below it the matmul branch's fixed cost (some 20 small
# nodes a layer) outweighs the re-reads it saves (bench-16e-8k: a slower decode from an empty cache).
MIN_MATMUL_HISTORY = 1024


def _decode_by_matmuls(b, q: str, k: str, v: str, cache_k: str, cache_v: str, cached: str, hq: int, hkv: int, d: int,
                       scale: float) -> list[str]:
    """One new token per row: write its key and value at each row's position `cached` [B] (ScatterND into
    the buffer, in place), then softmax(q k^T * scale) v over the positions <= cached, each KV head's
    buffer read once for all its query heads: q [B, 1, Hq, D] -> [B, Hkv, G, D] against [B, Hkv, C, D]."""
    shape = b.node("Shape", [cache_k])
    rows = b.node("Slice", [shape, b.int64s(0), b.int64s(1)])
    grid = b.node("Concat", [rows, b.int64s(hkv)], axis=0)                                 # [B, Hkv]
    row_index = b.node("Range", [b.const(0, "int64"), b.node("Squeeze", [rows, b.int64s(0)]), b.const(1, "int64")])
    columns = [b.node("Expand", [b.node("Unsqueeze", [row_index, b.int64s(1)]), grid]),
               b.node("Expand", [b.const(np.arange(hkv), "int64"), grid]),
               b.node("Expand", [b.node("Unsqueeze", [cached, b.int64s(1)]), grid])]
    where = b.node("Concat", [b.node("Unsqueeze", [c, b.int64s(-1)]) for c in columns], axis=-1)   # [B, Hkv, 3]
    present_k = b.node("ScatterND", [cache_k, where, b.node("Reshape", [k, b.int64s(0, hkv, d)])])
    present_v = b.node("ScatterND", [cache_v, where, b.node("Reshape", [v, b.int64s(0, hkv, d)])])
    queries = b.node("Reshape", [q, b.int64s(0, hkv, hq // hkv, d)])
    scores = b.node("FusedMatMul", [queries, present_k], domain=MS_DOMAIN, transB=1, alpha=scale)   # [B, Hkv, G, C]
    positions = b.node("Range", [b.const(0, "int64"), b.node("Gather", [shape, b.const(2, "int64")], axis=0),
                                 b.const(1, "int64")])
    later = b.node("Greater", [b.node("Unsqueeze", [positions, b.int64s(0)]), b.node("Unsqueeze", [cached, b.int64s(1)])])
    bias = b.node("Where", [later, b.scalar(float("-inf")), b.scalar(0.0)])                # [B, C]
    probs = b.node("Softmax", [b.node("Add", [scores, b.node("Unsqueeze", [bias, b.int64s(1, 2)])])], axis=-1)
    out = b.node("Reshape", [b.node("MatMul", [probs, present_v]), b.int64s(0, 1, hq * d)])
    return [out, present_k, present_v]


@register
class CacheLengths(Op):
    """What cache_attention derives from the step before attending, for every layer of a kind at once:
    past_lengths int64 [B], any tensor [B, S, ...] of the step (for S) and a cache buffer of the kind
    [B, Hkv, C, D] (for C) -> GroupQueryAttention's seqlens_k int32 [B] (cached positions plus new ones,
    minus 1) and total int32 [] (the longest row's), and bool []: whether a float32 decode step attends
    by matmuls (see cache_attention). Attributes: chunk_size as cache_attention's (a chunked layer's
    buffer holds past_lengths % chunk_size cached positions), group (query heads per KV head)."""

    name = "cache_lengths"

    def infer(self, inputs, attrs):
        past_lengths, step, cache = inputs
        expect(past_lengths.dtype == "int64" and past_lengths.rank == 1, self.name, f"past_lengths {past_lengths}")
        expect(step.rank >= 2 and cache.rank == 4, self.name, f"step {step} or cache {cache}")
        return [TensorType("int32", past_lengths.shape), TensorType("int32", ()), TensorType("bool", ())]

    def torch(self, torch, inputs, attrs):
        past_lengths, step, cache = inputs
        chunk = attrs["chunk_size"]
        cached = past_lengths % chunk if chunk else past_lengths
        seqlens = (cached + step.shape[1] - 1).to(torch.int32)
        longest = int(cached.max()) + 1
        by_matmuls = step.shape[1] == 1 and longest >= MIN_MATMUL_HISTORY and \
            cache.shape[2] * MATMUL_READ_COST <= longest * attrs["group"]
        return [seqlens, seqlens.max() + 1, torch.tensor(by_matmuls)]

    def onnx(self, b, inputs, attrs, types):
        return list(_step_lengths(b, *inputs, attrs["chunk_size"], attrs["group"]))



def _step_lengths(b, past_lengths: str, step: str, cache: str, chunk: int, group: int) -> tuple[str, str, str]:
    """GroupQueryAttention's seqlens_k (cached + new - 1 per row, int32) and longest total length, and
    whether a decode step attends by matmuls: one new token, longest row + 1 >= MIN_MATMUL_HISTORY and
    capacity * MATMUL_READ_COST <= (longest row + 1) * group."""
    cached = b.node("Mod", [past_lengths, b.const(chunk, "int64")]) if chunk else past_lengths
    new = b.node("Gather", [b.node("Shape", [step]), b.const(1, "int64")], axis=0)
    seqlens = b.node("Cast", [b.node("Sub", [b.node("Add", [cached, new]), b.const(1, "int64")])], to=6)
    total = b.node("Add", [b.node("ReduceMax", [seqlens], keepdims=0), b.const(1, "int32")])
    capacity = b.node("Gather", [b.node("Shape", [cache]), b.const(2, "int64")], axis=0)
    longest = b.node("Add", [b.node("ReduceMax", [cached], keepdims=0), b.const(1, "int64")])
    worth = b.node("LessOrEqual", [b.node("Mul", [capacity, b.const(MATMUL_READ_COST, "int64")]),
                                   b.node("Mul", [longest, b.const(group, "int64")])])
    long_enough = b.node("GreaterOrEqual", [longest, b.const(MIN_MATMUL_HISTORY, "int64")])
    decode = b.node("And", [b.node("Equal", [new, b.const(1, "int64")]), long_enough])
    return seqlens, total, b.node("And", [decode, worth])
