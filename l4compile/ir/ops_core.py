"""Core ops: embedding, linear, norms, elementwise, SwiGLU gating, head split."""

from __future__ import annotations

import numpy as np

from l4compile.ir.op import Op, OnnxBuilder, expect, get_op, register
from l4compile.ir.types import TensorType, broadcast_shapes

FLOAT = ("float32", "float16", "bfloat16")


def _to_float32(b: OnnxBuilder, x: str, dtype: str) -> str:
    return x if dtype == "float32" else b.node("Cast", [x], to=1)


def _from_float32(b: OnnxBuilder, x: str, dtype: str) -> str:
    from l4compile.ir.op import ONNX_DTYPES
    return x if dtype == "float32" else b.node("Cast", [x], to=ONNX_DTYPES[dtype])


@register
class Embedding(Op):
    """table[ids]: ids int64 [B, S], table [V, H] -> [B, S, H]."""

    name = "embedding"

    def infer(self, inputs, attrs):
        ids, table = inputs
        expect(ids.dtype == "int64", self.name, f"ids must be int64, got {ids}")
        expect(table.rank == 2, self.name, f"table must be 2-D, got {table}")
        return [TensorType(table.dtype, ids.shape + (table.shape[1],))]

    def torch(self, torch, inputs, attrs):
        ids, table = inputs
        return [torch.nn.functional.embedding(ids, table)]

    def onnx(self, b, inputs, attrs, types):
        ids, table = inputs
        return [b.node("Gather", [table, ids], axis=0)]


@register
class Linear(Op):
    """x @ w, w stored [in, out]; with transpose_weight, x @ w.T (w stored [out, in], e.g. tied embeddings)."""

    name = "linear"

    def infer(self, inputs, attrs):
        x, w = inputs
        expect(w.rank == 2, self.name, f"weight must be 2-D, got {w}")
        k, n = (w.shape[1], w.shape[0]) if attrs.get("transpose_weight") else w.shape
        expect(x.shape[-1] == k, self.name, f"input {x} does not match weight {w}")
        return [TensorType(x.dtype, x.shape[:-1] + (n,))]

    def torch(self, torch, inputs, attrs):
        x, w = inputs
        return [x @ (w.t() if attrs.get("transpose_weight") else w)]

    def weight_inputs(self, attrs):
        return {1: 1 if attrs.get("transpose_weight") else 0}

    def onnx(self, b, inputs, attrs, types):
        x, w = inputs
        if attrs.get("transpose_weight"):
            w = b.node("Transpose", [w], perm=[1, 0])
        return [b.node("MatMul", [x, w])]


def _rms(b: OnnxBuilder, x: str, eps: float) -> str:
    """x / sqrt(mean(x^2, -1) + eps), all float32: Pow, ReduceMean, Add, Sqrt, Div. Followed by a Mul with
    a 1-D scale, that is the pattern onnxruntime fuses into one SimplifiedLayerNormalization (and, after
    a residual Add, SkipSimplifiedLayerNormalization); TensorRT parses the standard ops."""
    mean_sq = b.node("ReduceMean", [b.node("Pow", [x, b.scalar(2.0)]), b.int64s(-1)], keepdims=1)
    return b.node("Div", [x, b.node("Sqrt", [b.node("Add", [mean_sq, b.scalar(eps)])])])


@register
class RMSNorm(Op):
    """x * rsqrt(mean(x^2) + eps) * weight, normalised in float32 (Llama4TextRMSNorm)."""

    name = "rms_norm"

    def infer(self, inputs, attrs):
        x, w = inputs
        expect(w.shape == (x.shape[-1],), self.name, f"weight {w} does not match input {x}")
        return [x]

    def torch(self, torch, inputs, attrs):
        x, w = inputs
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + attrs["eps"])
        return [normed.type_as(x) * w]

    def onnx(self, b, inputs, attrs, types):
        x, w = inputs
        dtype = types[0].dtype
        normed = _from_float32(b, _rms(b, _to_float32(b, x, dtype), attrs["eps"]), dtype)
        return [b.node("Mul", [normed, w])]


@register
class SkipRMSNorm(Op):
    """rms_norm(x + skip, weight) and the sum x + skip (the residual stream's next value), in one
    onnxruntime com.microsoft SkipSimplifiedLayerNormalization (passes/skip_rms_norm.py makes it)."""

    name = "skip_rms_norm"

    def infer(self, inputs, attrs):
        x, skip, w = inputs
        expect(x == skip, self.name, f"input {x} and skip {skip} differ")
        expect(w.shape == (x.shape[-1],), self.name, f"weight {w} does not match input {x}")
        return [x, x]

    def torch(self, torch, inputs, attrs):
        x, skip, w = inputs
        total = x + skip
        return get_op("rms_norm").torch(torch, [total, w], attrs) + [total]

    def onnx(self, b, inputs, attrs, types):
        out, _, _, total = b.node("SkipSimplifiedLayerNormalization", inputs, n_out=4, domain="com.microsoft",
                                  epsilon=float(attrs["eps"]))
        return [out, total]


@register
class L2Norm(Op):
    """Weightless x * rsqrt(mean(x^2) + eps) over the last dim (Llama 4's qk norm)."""

    name = "l2_norm"

    def infer(self, inputs, attrs):
        return [inputs[0]]

    def torch(self, torch, inputs, attrs):
        (x,) = inputs
        xf = x.float()
        return [(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + attrs["eps"])).type_as(x)]

    def onnx(self, b, inputs, attrs, types):
        dtype = types[0].dtype
        if dtype == "float32":  # times a unit scale: the pattern onnxruntime fuses (see _rms)
            ones = b.const(np.ones(types[0].shape[-1], np.float32))
            return [b.node("Mul", [_rms(b, inputs[0], attrs["eps"]), ones])]
        return [_from_float32(b, _rms(b, _to_float32(b, inputs[0], dtype), attrs["eps"]), dtype)]


class _Binary(Op):
    onnx_op = ""

    def infer(self, inputs, attrs):
        a, c = inputs
        expect(a.dtype == c.dtype, self.name, f"dtypes differ: {a} vs {c}")
        return [TensorType(a.dtype, broadcast_shapes(a.shape, c.shape))]

    def onnx(self, b, inputs, attrs, types):
        return [b.node(self.onnx_op, inputs)]


@register
class Add(_Binary):
    name, onnx_op = "add", "Add"

    def torch(self, torch, inputs, attrs):
        return [inputs[0] + inputs[1]]


@register
class Mul(_Binary):
    """Elementwise product; a float32 scale applied to a lower-precision tensor keeps the tensor's dtype."""

    name, onnx_op = "mul", "Mul"

    def infer(self, inputs, attrs):
        a, c = inputs
        return [TensorType(a.dtype, broadcast_shapes(a.shape, c.shape))]

    def torch(self, torch, inputs, attrs):
        a, c = inputs
        return [(a * c).to(a.dtype)]

    def onnx(self, b, inputs, attrs, types):
        a, c = inputs
        if types[0].dtype != types[1].dtype:
            from l4compile.ir.op import ONNX_DTYPES
            c = b.node("Cast", [c], to=ONNX_DTYPES[types[0].dtype])
        return [b.node("Mul", [a, c])]


@register
class SiluMul(Op):
    """silu(gate) * up: the SwiGLU gating of dense layers, experts and the shared expert. With one input
    [..., 2F] (passes/fuse_gate_up.py: gate and up from one matmul), its first half is gate, its second up."""

    name = "silu_mul"

    def infer(self, inputs, attrs):
        if len(inputs) == 1:
            (both,) = inputs
            expect(isinstance(both.shape[-1], int) and both.shape[-1] % 2 == 0, self.name,
                   f"one input must hold gate and up halves, got {both}")
            return [both.with_shape(both.shape[:-1] + (both.shape[-1] // 2,))]
        gate, up = inputs
        expect(gate.shape == up.shape, self.name, f"gate {gate} and up {up} differ")
        return [gate]

    def torch(self, torch, inputs, attrs):
        gate, up = inputs if len(inputs) == 2 else inputs[0].chunk(2, dim=-1)
        return [torch.nn.functional.silu(gate) * up]

    def onnx(self, b, inputs, attrs, types):
        if len(inputs) == 1:
            half = types[0].shape[-1] // 2
            gate, up = b.node("Split", [inputs[0], b.int64s(half, half)], n_out=2, axis=-1)
        else:
            gate, up = inputs
        silu = b.node("Mul", [gate, b.node("Sigmoid", [gate])])
        return [b.node("Mul", [silu, up])]


@register
class Concat(Op):
    """Tensors of one dtype joined along `axis` (passes/fuse_gate_up.py: two weights into one; onnxruntime
    folds a Concat of initializers once, when the session is created)."""

    name = "concat"

    def infer(self, inputs, attrs):
        first, axis = inputs[0], attrs["axis"]
        expect(len(inputs) >= 2, self.name, "needs two inputs or more")
        expect(-first.rank <= axis < first.rank, self.name, f"axis {axis} out of range for {first}")
        axis %= first.rank
        for t in inputs[1:]:
            expect(t.dtype == first.dtype and t.rank == first.rank and
                   all(a == c for i, (a, c) in enumerate(zip(t.shape, first.shape)) if i != axis),
                   self.name, f"{t} does not join {first} along axis {axis}")
        sizes = [t.shape[axis] for t in inputs]
        total = sum(sizes) if all(isinstance(n, int) for n in sizes) else None
        expect(total is not None, self.name, f"axis {axis} must have fixed sizes, got {sizes}")
        return [first.with_shape(first.shape[:axis] + (total,) + first.shape[axis + 1:])]

    def torch(self, torch, inputs, attrs):
        return [torch.cat(list(inputs), dim=attrs["axis"])]

    def onnx(self, b, inputs, attrs, types):
        return [b.node("Concat", list(inputs), axis=attrs["axis"])]


@register
class SplitHeads(Op):
    """[B, S, n*d] -> [B, S, n, d]."""

    name = "split_heads"

    def infer(self, inputs, attrs):
        (x,) = inputs
        n, d = attrs["num_heads"], attrs["head_dim"]
        expect(x.shape[-1] == n * d, self.name, f"{x} cannot split into {n} heads of {d}")
        return [x.with_shape(x.shape[:-1] + (n, d))]

    def torch(self, torch, inputs, attrs):
        (x,) = inputs
        return [x.reshape(*x.shape[:-1], attrs["num_heads"], attrs["head_dim"])]

    def onnx(self, b, inputs, attrs, types):
        return [b.node("Reshape", [inputs[0], b.int64s(0, 0, attrs["num_heads"], attrs["head_dim"])])]


@register
class MergeHeads(Op):
    """[B, S, n, d] -> [B, S, n*d], the inverse of split_heads (passes/flat_heads.py cancels the pairs)."""

    name = "merge_heads"

    def infer(self, inputs, attrs):
        (x,) = inputs
        expect(x.rank == 4 and isinstance(x.shape[2], int) and isinstance(x.shape[3], int), self.name,
               f"{x} is not [B, S, n, d]")
        return [x.with_shape(x.shape[:2] + (x.shape[2] * x.shape[3],))]

    def torch(self, torch, inputs, attrs):
        (x,) = inputs
        return [x.reshape(*x.shape[:2], -1)]

    def onnx(self, b, inputs, attrs, types):
        return [b.node("Reshape", [inputs[0], b.int64s(0, 0, types[0].shape[2] * types[0].shape[3])])]


def heads_view(t: TensorType, head_dim: int, op: str) -> TensorType:
    """The [B, S, n, d] view of a tensor given as such or with its heads flat, [B, S, n*d]."""
    if t.rank == 4:
        return t
    expect(t.rank == 3 and isinstance(t.shape[2], int) and t.shape[2] % head_dim == 0, op,
           f"{t} is neither [B, S, n, {head_dim}] nor [B, S, n*{head_dim}]")
    return t.with_shape(t.shape[:2] + (t.shape[2] // head_dim, head_dim))


@register
class Cast(Op):
    """Change the element type."""

    name = "cast"

    def infer(self, inputs, attrs):
        return [TensorType(attrs["dtype"], inputs[0].shape)]

    def torch(self, torch, inputs, attrs):
        return [inputs[0].to(getattr(torch, attrs["dtype"]))]

    def onnx(self, b, inputs, attrs, types):
        from l4compile.ir.op import ONNX_DTYPES
        return [b.node("Cast", [inputs[0]], to=ONNX_DTYPES[attrs["dtype"]])]
