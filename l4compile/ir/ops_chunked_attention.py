"""Chunked attention computed block by block: cost and memory O(seq * chunk), not O(seq^2).

Chunked causal attention (query p sees key t iff t <= p and t // chunk == p // chunk) splits
the queries in two parts:

  head  the queries in the chunk of the first query p0 (all of them, if they end inside it):
        they see keys of that chunk only, cached ones included, through a small causal mask
        [head, head_keys] (at most chunk x chunk). Decode is a head of one query that reads only
        its chunk's keys.
  body  the remaining queries, which start at a chunk boundary after p0 and are all new tokens,
        so their keys are exactly the last ones: padded to whole chunks, each chunk attends to
        itself under one [chunk, chunk] causal mask (empty when there is no body, as in decode).

`chunked_mask` computes both masks and the bounds once per model; every chunked layer's
`chunked_attention` reads them. Both assume what `positions` and `key_positions` produce:
query positions are one ascending run and the keys' run ends where the queries' does (the
chunked-attention pass only rewrites such layers). Under that assumption they equal
`attention_mask` + `attention` exactly, whatever the cache holds (e.g. a partial chunk).
"""

from __future__ import annotations

from l4compile.ir.op import ONNX_DTYPES, OnnxBuilder, Op, expect, get_op, register
from l4compile.ir.types import TensorType

HEAD_MASK_SHAPE = ("head", "head_keys")
BLOCK_MASK_SHAPE = ("block", "block")


@register
class ChunkedMask(Op):
    """q_pos [1, S], k_pos [1, T] -> head mask float32 [1, 1, head, head_keys] (0 / -inf), block mask
    float32 [block, block] (causal; block = chunk, or 0 without a body) and bounds int64 [3] =
    (head queries, first head key, end of head keys)."""

    name = "chunked_mask"

    def infer(self, inputs, attrs):
        q_pos, k_pos = inputs
        expect(q_pos.dtype == k_pos.dtype == "int64" and q_pos.rank == k_pos.rank == 2, self.name,
               f"positions must be int64 [1, n], got {q_pos} and {k_pos}")
        expect(attrs["chunk_size"] > 0, self.name, f"chunk_size must be positive, got {attrs['chunk_size']}")
        return [TensorType("float32", (q_pos.shape[0], 1) + HEAD_MASK_SHAPE), TensorType("float32", BLOCK_MASK_SHAPE),
                TensorType("int64", (3,))]

    def torch(self, torch, inputs, attrs):
        q_pos, k_pos = inputs
        c, p0, t0, seq = attrs["chunk_size"], int(q_pos[0, 0]), int(k_pos[0, 0]), q_pos.shape[1]
        chunk_start = p0 // c * c
        head = min(seq, chunk_start + c - p0)
        first, end = max(chunk_start - t0, 0), p0 + head - t0
        (mask,) = get_op("attention_mask").torch(torch, [q_pos[:, :head], k_pos[:, first:end]], {"chunk_size": 0})
        block = torch.arange(c if seq > head else 0)[None]
        (causal,) = get_op("attention_mask").torch(torch, [block, block], {"chunk_size": 0})
        return [mask, causal[0, 0], torch.tensor([head, first, end], dtype=torch.int64)]

    def onnx(self, b, inputs, attrs, types):
        q_pos, k_pos = inputs
        c = b.const(attrs["chunk_size"], "int64")
        p0, t0 = (b.node("Gather", [b.node("Reshape", [pos, b.int64s(-1)]), b.const(0, "int64")], axis=0)
                  for pos in (q_pos, k_pos))
        seq = b.node("Gather", [b.node("Shape", [q_pos]), b.const(1, "int64")], axis=0)
        chunk_start = b.node("Mul", [b.node("Div", [p0, c]), c])  # positions are >= 0: Div is floor division
        head = b.node("Min", [seq, b.node("Sub", [b.node("Add", [chunk_start, c]), p0])])
        first = b.node("Max", [b.node("Sub", [chunk_start, t0]), b.const(0, "int64")])
        end = b.node("Sub", [b.node("Add", [p0, head]), t0])
        q_head = _slice(b, q_pos, b.const(0, "int64"), head, axis=1)
        k_head = _slice(b, k_pos, first, end, axis=1)
        mask_types = [types[0].with_shape((1, "head")), types[1].with_shape((1, "head_keys"))]
        (mask,) = get_op("attention_mask").onnx(b, [q_head, k_head], {"chunk_size": 0}, mask_types)
        has_body = b.node("Cast", [b.node("Less", [head, seq])], to=ONNX_DTYPES["int64"])
        block = b.node("Unsqueeze", [b.node("Range", [b.const(0, "int64"), b.node("Mul", [has_body, c]),
                                                      b.const(1, "int64")]), b.int64s(0)])
        (causal,) = get_op("attention_mask").onnx(b, [block, block], {"chunk_size": 0}, mask_types)
        causal = b.node("Squeeze", [causal, b.int64s(0, 1)])
        bounds = b.node("Concat", [b.node("Unsqueeze", [v, b.int64s(0)]) for v in (head, first, end)], axis=0)
        return [mask, causal, bounds]


@register
class ChunkedAttention(Op):
    """Grouped-query chunked causal attention: q [B, S, Hq, D], k/v [B, T, Hkv, D], the masks and bounds
    of `chunked_mask` -> [B, S, Hq*D]; equal to `attention` under the chunked `attention_mask`."""

    name = "chunked_attention"

    def infer(self, inputs, attrs):
        q, k, v, mask, causal, bounds = inputs
        expect(attrs["chunk_size"] > 0, self.name, f"chunk_size must be positive, got {attrs['chunk_size']}")
        expect(mask.rank == 4 and causal.rank == 2 and bounds.shape == (3,) and bounds.dtype == "int64",
               self.name, f"masks {mask}, {causal} and bounds {bounds} must come from chunked_mask")
        return get_op("attention").infer([q, k, v, mask], attrs)

    def torch(self, torch, inputs, attrs):
        q, k, v, mask, causal, bounds = inputs
        head, first, end = bounds.tolist()
        attention = get_op("attention")
        (out_head,) = attention.torch(torch, [q[:, :head], k[:, first:end], v[:, first:end], mask], attrs)
        n, c = q.shape[1] - head, attrs["chunk_size"]
        if n == 0:
            return [out_head]
        blocks = -(-n // c)

        def as_blocks(x):  # [B, n, H, D] -> [B * blocks, c, H, D], zero-padded at the end
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, blocks * c - n))
            return x.reshape(x.shape[0] * blocks, c, *x.shape[2:])

        (out_body,) = attention.torch(torch, [as_blocks(q[:, head:]), as_blocks(k[:, end:]), as_blocks(v[:, end:]),
                                              causal[None, None]], attrs)
        out_body = out_body.reshape(q.shape[0], blocks * c, -1)[:, :n]
        return [torch.cat([out_head, out_body], dim=1)]

    def onnx(self, b, inputs, attrs, types):
        q, k, v, mask, causal, bounds = inputs
        head, first, end = (b.node("Gather", [bounds, b.const(i, "int64")], axis=0) for i in range(3))
        zero, big = b.const(0, "int64"), b.const(2 ** 62, "int64")
        head_types = [t.with_shape((t.shape[0], "head") + t.shape[2:]) for t in types[:3]] + [types[3]]
        (out_head,) = get_op("attention").onnx(
            b, [_slice(b, q, zero, head, 1), _slice(b, k, first, end, 1), _slice(b, v, first, end, 1), mask],
            attrs, head_types)
        out_body = _blockwise(b, _slice(b, q, head, big, 1), _slice(b, k, end, big, 1), _slice(b, v, end, big, 1),
                              causal, attrs, types)
        return [b.node("Concat", [out_head, out_body], axis=1)]


def _slice(b: OnnxBuilder, x: str, start: str, end: str, axis: int) -> str:
    def one(v: str) -> str:
        return b.node("Reshape", [v, b.int64s(1)])
    return b.node("Slice", [x, one(start), one(end), b.int64s(axis)])


def _blockwise(b: OnnxBuilder, q: str, k: str, v: str, causal: str, attrs: dict, types: list[TensorType]) -> str:
    """Causal attention of n new queries on their own n keys, one chunk at a time.

    Padded to whole chunks: a padded key sits after every real query of its chunk, so the
    causal mask hides it; padded queries are cut off. Shapes are explicit (Reshape allowzero)
    so that n = 0 (decode) runs through empty tensors.
    """
    c = attrs["chunk_size"]
    hq, hkv, d = types[0].shape[2], types[1].shape[2], types[0].shape[3]
    dtype = types[0].dtype
    shape = b.node("Shape", [q])
    batch = b.node("Slice", [shape, b.int64s(0), b.int64s(1)])
    n = b.node("Slice", [shape, b.int64s(1), b.int64s(2)])
    blocks = b.node("Div", [b.node("Add", [n, b.int64s(c - 1)]), b.int64s(c)])
    pad = b.node("Sub", [b.node("Mul", [blocks, b.int64s(c)]), n])
    pads = b.node("Concat", [b.int64s(0, 0, 0, 0, 0), pad, b.int64s(0, 0)], axis=0)  # pad axis 1 at its end
    block = b.node("Slice", [b.node("Shape", [causal]), b.int64s(0), b.int64s(1)])      # c, or 0 without a body

    def blocked(x: str, *dims: int) -> str:  # [B, n, H, D] -> [B, blocks, c, *dims]
        padded = b.node("Pad", [x, pads])
        target = b.node("Concat", [batch, blocks, block, b.int64s(*dims)], axis=0)
        return b.node("Reshape", [padded, target], allowzero=1)

    qb = b.node("Transpose", [blocked(q, hkv, hq // hkv, d)], perm=[0, 1, 3, 4, 2, 5])      # [B, n/c, Hkv, r, c, D]
    kb = b.node("Unsqueeze", [b.node("Transpose", [blocked(k, hkv, d)], perm=[0, 1, 3, 4, 2]), b.int64s(3)])
    vb = b.node("Unsqueeze", [b.node("Transpose", [blocked(v, hkv, d)], perm=[0, 1, 3, 2, 4]), b.int64s(3)])
    if dtype != "float32":
        causal = b.node("Cast", [causal], to=ONNX_DTYPES[dtype])
    scores = b.node("Add", [b.node("Mul", [b.node("MatMul", [qb, kb]), b.scalar(attrs["scale"], dtype)]), causal])
    out = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), vb])                    # [B, n/c, Hkv, r, c, D]
    out = b.node("Transpose", [out], perm=[0, 1, 4, 2, 3, 5])                              # [B, n/c, c, Hkv, r, D]
    flat = b.node("Concat", [batch, b.node("Mul", [blocks, b.int64s(c)]), b.int64s(hq * d)], axis=0)
    out = b.node("Reshape", [out, flat], allowzero=1)
    return b.node("Slice", [out, b.int64s(0), n, b.int64s(1)])
