"""Attention ops: positions, interleaved RoPE, temperature tuning, masks, GQA attention."""

from __future__ import annotations

import math

from l4compile.ir.op import Op, expect, register
from l4compile.ir.ops_core import heads_view
from l4compile.ir.types import TensorType


@register
class Positions(Op):
    """Absolute positions of the tokens in ids [B, S], starting at `offset` (cached tokens) if given:
    [1, S] for no offset or a scalar one; [B, S] for per-row offsets [B] (rows at different positions)."""

    name = "positions"

    def infer(self, inputs, attrs):
        ids = inputs[0]
        per_row = len(inputs) > 1 and inputs[1].rank == 1
        return [TensorType("int64", (ids.shape[0] if per_row else 1, ids.shape[1]))]

    def torch(self, torch, inputs, attrs):
        ids = inputs[0]
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        if len(inputs) == 1:
            return [pos]
        offset = inputs[1]
        return [pos + (offset[:, None] if offset.dim() == 1 else offset.reshape(1, 1))]

    def onnx(self, b, inputs, attrs, types):
        seq = b.node("Gather", [b.node("Shape", [inputs[0]]), b.const(1, "int64")], axis=0)
        pos = b.node("Range", [b.const(0, "int64"), seq, b.const(1, "int64")])
        if len(inputs) > 1 and types[1].rank == 1:
            return [b.node("Add", [b.node("Unsqueeze", [pos, b.int64s(0)]), b.node("Unsqueeze", [inputs[1], b.int64s(1)])])]
        if len(inputs) > 1:
            pos = b.node("Add", [pos, b.node("Reshape", [inputs[1], b.int64s(1)])])
        return [b.node("Unsqueeze", [pos, b.int64s(0)])]


@register
class RopeAngles(Op):
    """cos and sin of positions * inv_freq: positions int64 [P, S], inv_freq [D/2] -> 2 x float32 [P, S, D/2]."""

    name = "rope_angles"

    def infer(self, inputs, attrs):
        pos, inv_freq = inputs
        t = TensorType("float32", pos.shape + inv_freq.shape)
        return [t, t]

    def torch(self, torch, inputs, attrs):
        pos, inv_freq = inputs
        freqs = pos[..., None].float() * inv_freq.float()
        return [torch.cos(freqs), torch.sin(freqs)]

    def onnx(self, b, inputs, attrs, types):
        pos, inv_freq = inputs
        freqs = b.node("Mul", [b.node("Unsqueeze", [b.node("Cast", [pos], to=1), b.int64s(-1)]), inv_freq])
        return [b.node("Cos", [freqs]), b.node("Sin", [freqs])]


@register
class Rope(Op):
    """Interleaved-pair rotary embedding: pairs (x0, x1), (x2, x3), ... rotate as complex numbers.

    x [B, S, n, d] or with its heads flat, [B, S, n*d] (passes/flat_heads.py); cos/sin [P, S, d/2]; computed
    in float32 like transformers' apply_rotary_emb.
    """

    name = "rope"

    def infer(self, inputs, attrs):
        x, cos, sin = inputs
        heads_view(x, 2 * cos.shape[-1], self.name)
        return [x]

    def torch(self, torch, inputs, attrs):
        x, cos, sin = inputs
        if x.dim() == 3:   # heads flat
            (out,) = self.torch(torch, [x.reshape(*x.shape[:2], -1, 2 * cos.shape[-1]), cos, sin], attrs)
            return [out.reshape(x.shape)]
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3)
        return [out.type_as(x)]

    def onnx(self, b, inputs, attrs, types):
        x, cos, sin = inputs
        half = types[1].shape[-1]
        flat = types[0].rank == 3
        heads = heads_view(types[0], 2 * half, self.name).shape[2]
        if attrs.get("impl") == "ort":
            return [self._onnxruntime(b, x, cos, sin, heads, half, flat)]
        xf = x if types[0].dtype == "float32" else b.node("Cast", [x], to=1)
        pairs = b.node("Reshape", [xf, b.int64s(0, 0, heads, half, 2)])
        x0, x1 = b.node("Split", [pairs, b.int64s(1, 1)], n_out=2, axis=-1)
        c = b.node("Unsqueeze", [cos, b.int64s(2, 4)])  # [P, S, 1, d/2, 1]
        s = b.node("Unsqueeze", [sin, b.int64s(2, 4)])
        out0 = b.node("Sub", [b.node("Mul", [x0, c]), b.node("Mul", [x1, s])])
        out1 = b.node("Add", [b.node("Mul", [x0, s]), b.node("Mul", [x1, c])])
        shape = (0, 0, heads * 2 * half) if flat else (0, 0, heads, 2 * half)
        out = b.node("Reshape", [b.node("Concat", [out0, out1], axis=-1), b.int64s(*shape)])
        if types[0].dtype != "float32":
            from l4compile.ir.op import ONNX_DTYPES
            out = b.node("Cast", [out], to=ONNX_DTYPES[types[0].dtype])
        return [out]


    @staticmethod
    def _onnxruntime(b, x, cos, sin, heads: int, half: int, flat: bool) -> str:
        """onnxruntime's RotaryEmbedding (float32, one table row per batch row, heads flat): the angle tables
        [P, S, d/2] flattened to [P*S, d/2], each token reading its own row through position ids arange(P*S)
        [P, S]."""
        tables = [b.node("Reshape", [t, b.int64s(-1, half)]) for t in (cos, sin)]
        rows = b.node("Slice", [b.node("Shape", [cos]), b.int64s(0), b.int64s(2)])
        count = b.node("ReduceProd", [rows], keepdims=0)
        ids = b.node("Reshape", [b.node("Range", [b.const(0, "int64"), count, b.const(1, "int64")]), rows])
        if not flat:
            x = b.node("Reshape", [x, b.int64s(0, 0, heads * 2 * half)])
        out = b.node("RotaryEmbedding", [x, ids] + tables, domain="com.microsoft", interleaved=1, num_heads=heads)
        return out if flat else b.node("Reshape", [out, b.int64s(0, 0, heads, 2 * half)])


@register
class TemperatureScale(Op):
    """Per-position query scale of NoPE layers: 1 + attn_scale * log(1 + floor((p + 1) / floor_scale)) -> [P, S, 1, 1]."""

    name = "temperature_scale"

    def infer(self, inputs, attrs):
        (pos,) = inputs
        return [TensorType("float32", pos.shape + (1, 1))]

    def torch(self, torch, inputs, attrs):
        (pos,) = inputs
        scale = torch.log1p(torch.floor((pos.float() + 1.0) / attrs["floor_scale"])) * attrs["attn_scale"] + 1.0
        return [scale[..., None, None]]

    def onnx(self, b, inputs, attrs, types):
        p1 = b.node("Add", [b.node("Cast", [inputs[0]], to=1), b.scalar(1.0)])
        floored = b.node("Floor", [b.node("Div", [p1, b.scalar(float(attrs["floor_scale"]))])])
        log1p = b.node("Log", [b.node("Add", [floored, b.scalar(1.0)])])
        scale = b.node("Add", [b.node("Mul", [log1p, b.scalar(attrs["attn_scale"])]), b.scalar(1.0)])
        return [b.node("Unsqueeze", [scale, b.int64s(-1, -2)])]


@register
class AttentionMask(Op):
    """Additive causal mask [P, 1, S, T]: 0 where key t is visible from query p, -inf elsewhere.

    chunk_size > 0: chunked causal (t <= p and t // chunk == p // chunk); 0: global causal.
    """

    name = "attention_mask"

    def infer(self, inputs, attrs):
        q, k = inputs
        return [TensorType("float32", (q.shape[0], 1, q.shape[1], k.shape[1]))]

    def torch(self, torch, inputs, attrs):
        q_pos, k_pos = inputs
        q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
        allowed = k <= q
        chunk = attrs["chunk_size"]
        if chunk:
            allowed = allowed & (torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor"))
        zero = torch.zeros((), dtype=torch.float32)
        return [torch.where(allowed, zero, torch.tensor(-math.inf))]

    def onnx(self, b, inputs, attrs, types):
        q = b.node("Unsqueeze", [inputs[0], b.int64s(1, 3)])
        k = b.node("Unsqueeze", [inputs[1], b.int64s(1, 2)])
        allowed = b.node("LessOrEqual", [k, q])
        chunk = attrs["chunk_size"]
        if chunk:
            c = b.const(chunk, "int64")  # positions are >= 0, so Div truncation is floor division
            allowed = b.node("And", [allowed, b.node("Equal", [b.node("Div", [k, c]), b.node("Div", [q, c])])])
        return [b.node("Where", [allowed, b.scalar(0.0), b.scalar(-math.inf)])]


@register
class Attention(Op):
    """Grouped-query attention: q [B, S, Hq, D], k/v [B, T, Hkv, D], mask [P, 1, S, T] -> [B, S, Hq*D].

    softmax(q k^T * scale + mask) v, each KV head serving Hq/Hkv consecutive query heads.
    """

    name = "attention"

    def infer(self, inputs, attrs):
        q, k, v, mask = inputs
        expect(q.rank == 4 and k.rank == 4 and v.rank == 4, self.name, "q, k, v must be [B, S, H, D]")
        expect(q.shape[3] == k.shape[3] == v.shape[3], self.name, f"head dims differ: {q} {k} {v}")
        expect(isinstance(q.shape[2], int) and q.shape[2] % k.shape[2] == 0, self.name,
               f"{q.shape[2]} query heads do not group over {k.shape[2]} KV heads")
        return [q.with_shape((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]))]

    def torch(self, torch, inputs, attrs):
        q, k, v, mask = inputs
        rep = q.shape[2] // k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * attrs["scale"] + mask.to(q.dtype)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return [out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)]

    def onnx(self, b, inputs, attrs, types):
        q, k, v, mask = inputs
        hq, hkv, d = types[0].shape[2], types[1].shape[2], types[0].shape[3]
        q5 = b.node("Reshape", [b.node("Transpose", [q], perm=[0, 2, 1, 3]), b.int64s(0, hkv, hq // hkv, -1, d)])
        kt = b.node("Unsqueeze", [b.node("Transpose", [k], perm=[0, 2, 3, 1]), b.int64s(2)])  # [B, Hkv, 1, D, T]
        vt = b.node("Unsqueeze", [b.node("Transpose", [v], perm=[0, 2, 1, 3]), b.int64s(2)])  # [B, Hkv, 1, T, D]
        scores = b.node("Mul", [b.node("MatMul", [q5, kt]), b.scalar(attrs["scale"], types[0].dtype)])
        if types[0].dtype != "float32":
            from l4compile.ir.op import ONNX_DTYPES
            mask = b.node("Cast", [mask], to=ONNX_DTYPES[types[0].dtype])
        scores = b.node("Add", [scores, b.node("Unsqueeze", [mask, b.int64s(1)])])
        out = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), vt])  # [B, Hkv, rep, S, D]
        out = b.node("Transpose", [b.node("Reshape", [out, b.int64s(0, hq, -1, d)])], perm=[0, 2, 1, 3])
        return [b.node("Reshape", [out, b.int64s(0, 0, hq * d)])]
