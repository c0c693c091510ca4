"""Ops of incremental decoding: KV-cache concatenation, key positions, layout changes, logits slicing.

The KV cache is kept sequence-major, [positions, batch, kv_heads, head_dim], so that
a runtime can hand the first n positions of a preallocated buffer to the model
as a contiguous view, without copying.
"""

from __future__ import annotations

from l4compile.ir.op import Op, expect, register
from l4compile.ir.types import TensorType, dim_add


@register
class Transpose(Op):
    """Permute dimensions."""

    name = "transpose"

    def infer(self, inputs, attrs):
        (x,) = inputs
        perm = attrs["perm"]
        expect(sorted(perm) == list(range(x.rank)), self.name, f"perm {perm} for {x}")
        return [x.with_shape(tuple(x.shape[i] for i in perm))]

    def torch(self, torch, inputs, attrs):
        return [inputs[0].permute(*attrs["perm"])]

    def onnx(self, b, inputs, attrs, types):
        return [b.node("Transpose", inputs, perm=list(attrs["perm"]))]


@register
class KVConcat(Op):
    """Cached positions then new ones: past [P, B, H, D] (sequence-major), new [B, S, H, D] -> [B, P+S, H, D]."""

    name = "kv_concat"

    def infer(self, inputs, attrs):
        past, new = inputs
        expect(past.rank == 4 and new.rank == 4 and past.shape[2:] == new.shape[2:], self.name,
               f"cache {past} does not match new keys/values {new}")
        return [new.with_shape((new.shape[0], dim_add(past.shape[0], new.shape[1])) + new.shape[2:])]

    def torch(self, torch, inputs, attrs):
        past, new = inputs
        return [torch.cat([past.permute(1, 0, 2, 3).to(new.dtype), new], dim=1)]

    def onnx(self, b, inputs, attrs, types):
        past, new = inputs
        return [b.node("Concat", [b.node("Transpose", [past], perm=[1, 0, 2, 3]), new], axis=1)]


@register
class KeyPositions(Op):
    """Absolute positions [1, P+S] of the keys: the P cached ones end where the new ids start (past_length)."""

    name = "key_positions"

    def infer(self, inputs, attrs):
        past_length, past, ids = inputs
        expect(past_length.dtype == "int64" and past_length.rank == 0, self.name, f"past_length {past_length}")
        return [TensorType("int64", (1, dim_add(past.shape[0], ids.shape[1])))]

    def torch(self, torch, inputs, attrs):
        past_length, past, ids = inputs
        start = past_length - past.shape[0]
        return [torch.arange(start, past_length + ids.shape[1], device=ids.device)[None]]

    def onnx(self, b, inputs, attrs, types):
        past_length, past, ids = inputs
        cached = b.node("Gather", [b.node("Shape", [past]), b.const(0, "int64")], axis=0)
        new = b.node("Gather", [b.node("Shape", [ids]), b.const(1, "int64")], axis=0)
        # The length comes from shapes alone (cached + new), the values from past_length: TensorRT then
        # sizes this without reading past_length, which stays an ordinary (device) input.
        offsets = b.node("Range", [b.const(0, "int64"), b.node("Add", [cached, new]), b.const(1, "int64")])
        start = b.node("Sub", [past_length, cached])
        return [b.node("Unsqueeze", [b.node("Add", [offsets, start]), b.int64s(0)])]


@register
class SliceSeq(Op):
    """x[:, start:] along the sequence axis: logits only for the positions a caller needs."""

    name = "slice_seq"

    def infer(self, inputs, attrs):
        x, start = inputs
        expect(start.dtype == "int64" and start.rank == 0, self.name, f"start {start}")
        return [x.with_shape((x.shape[0], f"{x.shape[1]}-start") + x.shape[2:])]

    def torch(self, torch, inputs, attrs):
        x, start = inputs
        return [x[:, int(start):]]

    def onnx(self, b, inputs, attrs, types):
        x, start = inputs
        starts = b.node("Reshape", [start, b.int64s(1)])
        return [b.node("Slice", [x, starts, b.int64s(2 ** 62), b.int64s(1)])]
