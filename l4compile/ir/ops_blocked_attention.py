"""Global causal attention one block of queries at a time: memory O(seq * block), not O(seq^2).

`blocked_attention` equals `attention` under a global causal `attention_mask` (query p sees key t
iff t <= p) when, as `positions` and `key_positions` make them, the query positions are one
ascending run and the keys' run ends where the queries' does. Its ONNX lowering is an ONNX Loop
over blocks of `block` queries (fewer when the step has fewer tokens, so decode is one block of
one query): each block attends to the keys up to its last query only, so the scores of a block
are [block, keys so far] and the upper triangle beyond the block is never computed.
"""

from __future__ import annotations

import onnx

from l4compile.ir.op import ONNX_DTYPES, Op, expect, get_op, register


@register
class BlockedAttention(Op):
    """q [B, S, Hq, D], k/v [B, T, Hkv, D], query positions [1, S], key positions [1, T] -> [B, S, Hq*D]."""

    name = "blocked_attention"

    def infer(self, inputs, attrs):
        q, k, v, q_pos, k_pos = inputs
        expect(attrs["block"] > 0, self.name, f"block must be positive, got {attrs['block']}")
        expect(q_pos.dtype == k_pos.dtype == "int64", self.name, f"positions must be int64: {q_pos}, {k_pos}")
        return get_op("attention").infer([q, k, v, q_pos], attrs)

    def torch(self, torch, inputs, attrs):
        """The reference: the causal mask of the positions, then attention."""
        q, k, v, q_pos, k_pos = inputs
        (mask,) = get_op("attention_mask").torch(torch, [q_pos, k_pos], {"chunk_size": 0})
        return get_op("attention").torch(torch, [q, k, v, mask], attrs)

    def onnx(self, b, inputs, attrs, types):
        q, k, v, q_pos, k_pos = inputs
        hq, d, dtype = types[0].shape[2], types[0].shape[3], types[0].dtype
        zero, one = b.const(0, "int64"), b.const(1, "int64")

        def dim(x: str, axis: int) -> str:
            return b.node("Gather", [b.node("Shape", [x]), b.const(axis, "int64")], axis=0)

        def one_d(x: str) -> str:
            return b.node("Reshape", [x, b.int64s(1)])

        batch, seq, keys = dim(q, 0), dim(q, 1), dim(k, 1)
        cached = b.node("Sub", [keys, seq])                       # keys before the first query
        block = b.node("Min", [seq, b.const(attrs["block"], "int64")])
        blocks = b.node("Div", [b.node("Sub", [b.node("Add", [seq, block]), one]), block])
        pad = b.node("Sub", [b.node("Mul", [blocks, block]), seq])
        q_padded = b.node("Pad", [q, b.node("Concat", [b.int64s(0, 0, 0, 0, 0), one_d(pad), b.int64s(0, 0)], axis=0)])
        step, cond = b.fresh("block_index"), b.fresh("cond")
        with b.capture() as body_nodes:
            first = b.node("Mul", [step, block])                  # first query of the block
            q_block = b.node("Slice", [q_padded, one_d(first), one_d(b.node("Add", [first, block])), b.int64s(1)])
            seen = b.node("Min", [b.node("Add", [b.node("Add", [cached, first]), block]), keys])
            k_block = b.node("Slice", [k, b.int64s(0), one_d(seen), b.int64s(1)])
            v_block = b.node("Slice", [v, b.int64s(0), one_d(seen), b.int64s(1)])
            # the block's causal mask over key indices: key i is visible from query j iff i <= cached + first + j
            q_index = b.node("Unsqueeze", [b.node("Range", [b.node("Add", [cached, first]),
                                                            b.node("Add", [b.node("Add", [cached, first]), block]),
                                                            one]), b.int64s(0)])
            k_index = b.node("Unsqueeze", [b.node("Range", [zero, seen, one]), b.int64s(0)])
            mask_types = [types[3].with_shape((1, "block")), types[4].with_shape((1, "seen"))]
            (mask,) = get_op("attention_mask").onnx(b, [q_index, k_index], {"chunk_size": 0}, mask_types)
            block_types = [t.with_shape((t.shape[0], "block") + t.shape[2:]) for t in types[:3]] + [types[3]]
            (out,) = get_op("attention").onnx(b, [q_block, k_block, v_block, mask], attrs, block_types)
            cond_out = b.node("Identity", [cond])
        info = onnx.helper.make_tensor_value_info
        body = onnx.helper.make_graph(
            body_nodes, b.fresh("query_blocks"),
            [info(step, onnx.TensorProto.INT64, []), info(cond, onnx.TensorProto.BOOL, [])],
            [info(cond_out, onnx.TensorProto.BOOL, []), info(out, ONNX_DTYPES[dtype], ["batch", "block", hq * d])])
        stacked = b.node("Loop", [blocks, ""], body=body)         # [blocks, B, block, Hq*D]
        flat = b.node("Reshape", [b.node("Transpose", [stacked], perm=[1, 0, 2, 3]),
                                  b.node("Concat", [one_d(batch), b.int64s(-1, hq * d)], axis=0)])
        return [b.node("Slice", [flat, b.int64s(0), one_d(seq), b.int64s(1)])]
