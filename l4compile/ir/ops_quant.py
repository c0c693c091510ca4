"""Quantization ops: dequantize / quantize (ONNX DequantizeLinear / QuantizeLinear semantics) and
4-bit weight-only matmuls (onnxruntime's com.microsoft MatMulNBits).

`dequantize` follows ONNX (opset 21) exactly: a scalar scale is per tensor; a 1-D scale with
block_size 0 is per channel along `axis`; with block_size > 0 the scale has the input's rank and
one scale covers `block_size` consecutive elements along `axis`. 4-bit weights use MatMulNBits'
layout: the weight [K, N] is stored transposed and blocked along K, codes = value / scale + 8.
"""

from __future__ import annotations

import numpy as np
import onnx.helper

from l4compile.ir.op import ONNX_DTYPES, Op, expect, get_op, register
from l4compile.ir.ops_moe_dispatch import ort_routing
from l4compile.ir.types import TensorType
from l4compile.quant.schemes import FP8_MAX

CODE_DTYPES = ("float8e4m3fn", "int8")
FLOAT = ("float32", "float16", "bfloat16")
MS_DOMAIN = "com.microsoft"


def _scale_layout_ok(q: TensorType, scale: TensorType, axis: int, block_size: int) -> bool:
    if scale.rank == 0:
        return True
    axis = axis % q.rank
    if block_size == 0:
        return scale.rank == 1 and scale.shape[0] == q.shape[axis]
    if scale.rank != q.rank or any(s != d for i, (s, d) in enumerate(zip(scale.shape, q.shape)) if i != axis):
        return False
    n = q.shape[axis]
    return not isinstance(n, int) or scale.shape[axis] == -(-n // block_size)


@register
class Dequantize(Op):
    """codes (float8e4m3fn or int8) * scale -> the scale's dtype; per tensor, per channel or blocked."""

    name = "dequantize"

    def infer(self, inputs, attrs):
        q, scale = inputs
        expect(q.dtype in CODE_DTYPES, self.name, f"codes must be one of {CODE_DTYPES}, got {q}")
        expect(scale.dtype in FLOAT, self.name, f"scale must be a float, got {scale}")
        expect(_scale_layout_ok(q, scale, attrs.get("axis", 1), attrs.get("block_size", 0)), self.name,
               f"scale {scale} does not fit codes {q} (axis {attrs.get('axis', 1)}, "
               f"block_size {attrs.get('block_size', 0)})")
        return [TensorType(scale.dtype, q.shape)]

    def torch(self, torch, inputs, attrs):
        q, scale = inputs
        values = q.to(scale.dtype)
        if scale.dim() == 0:
            return [values * scale]
        axis, block = attrs.get("axis", 1) % q.dim(), attrs.get("block_size", 0)
        if block == 0:
            shape = [1] * q.dim()
            shape[axis] = -1
            return [values * scale.reshape(shape)]
        return [values * scale.repeat_interleave(block, dim=axis).narrow(axis, 0, q.shape[axis])]

    def onnx(self, b, inputs, attrs, types):
        extra = {"block_size": attrs["block_size"]} if attrs.get("block_size") else {}
        return [b.node("DequantizeLinear", inputs, axis=attrs.get("axis", 1), **extra)]


@register
class Quantize(Op):
    """x / scale, saturated to float8e4m3fn (per-tensor scale): an activation's Q of a Q/DQ pair."""

    name = "quantize"

    def infer(self, inputs, attrs):
        x, scale = inputs
        expect(attrs.get("dtype", "float8e4m3fn") == "float8e4m3fn", self.name, "only float8e4m3fn is supported")
        expect(scale.rank == 0 and scale.dtype == x.dtype, self.name, f"scale must be a scalar {x.dtype}, got {scale}")
        return [TensorType("float8e4m3fn", x.shape)]

    def torch(self, torch, inputs, attrs):
        x, scale = inputs
        return [(x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)]

    def onnx(self, b, inputs, attrs, types):
        import ml_dtypes
        zero_point = b.const(np.zeros((), dtype=ml_dtypes.float8_e4m3fn))  # gives the output type
        return [b.node("QuantizeLinear", [*inputs, zero_point], saturate=1)]


def unpack_int4(torch, q, scale, k: int, block_size: int):
    """MatMulNBits codes [..., N, k_blocks, block/2] and scales [..., N, k_blocks] -> weights [..., N, K]."""
    codes = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(*q.shape[:-2], -1)[..., :k]
    values = codes.to(scale.dtype) - 8
    return values * scale.repeat_interleave(block_size, dim=-1)[..., :k]


def unpack_nbits(torch, q, scale, k: int, block_size: int, bits: int):
    """MatMulNBits codes of 4 or 8 bits -> weights [..., N, K] (8 bits: [..., N, k_blocks, block], value + 128)."""
    if bits == 4:
        return unpack_int4(torch, q, scale, k, block_size)
    values = q.reshape(*q.shape[:-2], -1)[..., :k].to(scale.dtype) - 128
    return values * scale.repeat_interleave(block_size, dim=-1)[..., :k]


def _check_nbits(op: str, q: TensorType, scale: TensorType, k, attrs) -> None:
    block, bits = attrs["block_size"], attrs.get("bits", 4)
    expect(bits in (4, 8), op, f"only 4- and 8-bit weights are supported, got bits={bits}")
    expect(block >= 16 and block & (block - 1) == 0, op, f"block_size must be a power of 2 >= 16, got {block}")
    expect(q.dtype == "uint8" and scale.dtype in FLOAT, op, f"codes {q} must be uint8, scales {scale} a float")
    expect(q.shape[-2:] == (-(-k // block), block * bits // 8) and scale.shape == q.shape[:-1], op,
           f"codes {q} and scales {scale} do not hold K={k} in blocks of {block}")


@register
class MatMulNBits(Op):
    """x [..., K] @ W [K, N], W stored as 4-bit codes [N, k_blocks, block/2] (or, with bits=8, 8-bit codes
    [N, k_blocks, block]) and scales [N, k_blocks]."""

    name = "matmul_nbits"

    def infer(self, inputs, attrs):
        x, q, scale = inputs
        expect(x.dtype in FLOAT and q.rank == 3, self.name, f"input {x}, codes {q}")
        _check_nbits(self.name, q, scale, x.shape[-1], attrs)
        return [TensorType(x.dtype, x.shape[:-1] + (q.shape[0],))]

    def torch(self, torch, inputs, attrs):
        x, q, scale = inputs
        weight = unpack_nbits(torch, q, scale, x.shape[-1], attrs["block_size"], attrs.get("bits", 4))
        return [x @ weight.t().to(x.dtype)]

    def onnx(self, b, inputs, attrs, types):
        x, q, _ = types
        return [b.node("MatMulNBits", inputs, domain=MS_DOMAIN, K=x.shape[-1], N=q.shape[0], bits=attrs.get("bits", 4),
                       block_size=attrs["block_size"], accuracy_level=attrs.get("accuracy_level", 0))]


class _ExpertsNBits:
    """MatMulNBits attributes and per-expert SwiGLU MLPs over stacked 4-bit expert weights:
    gate_up codes [E, 2F, H/block, block/2] and scales [E, 2F, H/block], down codes
    [E, H, F/block, block/2] and scales [E, H, F/block]."""

    def __init__(self, weights: list[str], types: list[TensorType], attrs: dict) -> None:
        self.gate_up, self.gate_up_scale, self.down, self.down_scale = weights
        (self.experts, f2), self.hidden = types[2].shape[:2], types[0].shape[-1]
        self.inner = f2 // 2
        self.nbits = dict(domain=MS_DOMAIN, bits=attrs.get("bits", 4), block_size=attrs["block_size"],
                          accuracy_level=attrs.get("accuracy_level", 0))

    def mlp(self, b, rows: str, expert: int) -> str:
        """down(silu(gate) * up) of rows [M, H] through expert `expert`'s weights -> [M, H]."""
        def take(stacked: str) -> str:
            return b.node("Gather", [stacked, b.const(expert, "int64")], axis=0)  # folded by onnxruntime
        both = b.node("MatMulNBits", [rows, take(self.gate_up), take(self.gate_up_scale)],
                      K=self.hidden, N=2 * self.inner, **self.nbits)
        gate, up = b.node("Split", [both, b.int64s(self.inner, self.inner)], n_out=2, axis=-1)
        act = b.node("Mul", [up, b.node("Mul", [gate, b.node("Sigmoid", [gate])])])
        return b.node("MatMulNBits", [act, take(self.down), take(self.down_scale)],
                      K=self.inner, N=self.hidden, **self.nbits)

    @staticmethod
    def dequantized(torch, inputs, attrs):
        """The float weights gate_up [E, H, 2F] and down [E, F, H] of the torch reference."""
        x, _, gate_up, gate_up_scale, down, down_scale = inputs
        block, h, f, bits = attrs["block_size"], x.shape[-1], gate_up.shape[1] // 2, attrs.get("bits", 4)
        return (unpack_nbits(torch, gate_up, gate_up_scale, h, block, bits).transpose(1, 2).to(x.dtype),
                unpack_nbits(torch, down, down_scale, f, block, bits).transpose(1, 2).to(x.dtype))

    @staticmethod
    def check(op: str, inputs: list[TensorType], attrs: dict) -> None:
        x, routing, gate_up, gate_up_scale, down, down_scale = inputs
        e, f2, h = gate_up.shape[0], gate_up.shape[1], x.shape[-1]
        expect(routing.shape[-1] == e and down.shape[:2] == (e, h), op,
               f"x {x}, router {routing}, gate_up {gate_up}, down {down}")
        _check_nbits(op, gate_up, gate_up_scale, h, attrs)
        _check_nbits(op, down, down_scale, f2 // 2, attrs)


@register
class MoEExpertsNBits(Op):
    """`moe_experts` with 4-bit stacked expert weights (layout in `_ExpertsNBits`).

    x [B, S, H], scores [B, S, E] -> [B, S, H]. The ONNX form runs one MatMulNBits per expert and
    projection, every expert on every token, masked by its score (the unfused form).
    """

    name = "moe_experts_nbits"

    def infer(self, inputs, attrs):
        _ExpertsNBits.check(self.name, inputs, attrs)
        return [inputs[0]]

    def torch(self, torch, inputs, attrs):
        x, scores = inputs[:2]
        return get_op("moe_experts").torch(torch, [x, scores, *_ExpertsNBits.dequantized(torch, inputs, attrs)], {})

    def onnx(self, b, inputs, attrs, types):
        x, scores = inputs[:2]
        experts = _ExpertsNBits(inputs[2:], types, attrs)
        tokens = b.node("Reshape", [x, b.int64s(-1, experts.hidden)])                 # [T, H]
        per_token = b.node("Reshape", [scores, b.int64s(-1, experts.experts)])        # [T, E]
        outs = []
        for i in range(experts.experts):
            score = b.node("Slice", [per_token, b.int64s(i), b.int64s(i + 1), b.int64s(1)])   # [T, 1]
            outs.append(experts.mlp(b, b.node("Mul", [tokens, score]), i))
        summed = outs[0] if len(outs) == 1 else b.node("Sum", outs)
        return [b.node("Reshape", [summed, b.node("Shape", [x])])]


@register
class MoEDispatchNBits(Op):
    """`moe_dispatch` with 4-bit stacked expert weights (layout in `_ExpertsNBits`).

    x [B, S, H], router logits [B, S, E] -> [B, S, H]; each token runs only its top_k experts. The
    ONNX form follows `moe_dispatch`'s `impl`: "ort" (top-1) runs onnxruntime's com.microsoft QMoE;
    otherwise the experts are unrolled: expert e gathers its (token, slot) pairs (NonZero), runs two
    MatMulNBits on those rows (none at all when no token chose it) and scatter-adds them back.
    """

    name = "moe_dispatch_nbits"

    def infer(self, inputs, attrs):
        _ExpertsNBits.check(self.name, inputs, attrs)
        expect(1 <= attrs["top_k"] <= inputs[2].shape[0], self.name, f"top_k {attrs['top_k']}")
        return [inputs[0]]

    def torch(self, torch, inputs, attrs):
        x, logits = inputs[:2]
        return get_op("moe_dispatch").torch(torch, [x, logits, *_ExpertsNBits.dequantized(torch, inputs, attrs)],
                                            {"top_k": attrs["top_k"], "impl": "gather"})

    def onnx(self, b, inputs, attrs, types):
        x, logits = inputs[:2]
        experts, k = _ExpertsNBits(inputs[2:], types, attrs), attrs["top_k"]
        dtype, block = types[0].dtype, attrs["block_size"]
        if attrs.get("impl") == "ort" and k == 1 and experts.hidden % block == 0 and experts.inner % block == 0:
            return [_ort_qmoe(b, experts, x, logits, dtype)]
        tokens = b.node("Reshape", [x, b.int64s(-1, experts.hidden)])                  # [N, H]
        per_token = b.node("Reshape", [logits, b.int64s(-1, experts.experts)])        # [N, E]
        if dtype != "float32":   # TopK has no bfloat16 kernel; the selection is unchanged in float32
            per_token = b.node("Cast", [per_token], to=1)
        top_value, chosen = b.node("TopK", [per_token, b.int64s(k)], n_out=2, axis=-1)
        scores = b.node("Sigmoid", [top_value])
        if dtype != "float32":
            scores = b.node("Cast", [scores], to=ONNX_DTYPES[dtype])
        out = self._unrolled(b, experts, tokens, chosen, scores, k, dtype)
        return [b.node("Reshape", [out, b.node("Shape", [x])])]

    @staticmethod
    def _unrolled(b, experts: _ExpertsNBits, tokens: str, chosen: str, scores: str, k: int, dtype: str) -> str:
        pair_experts = b.node("Reshape", [chosen, b.int64s(-1)])                       # [N*k], token-major
        rows, pair_tokens = tokens, None
        if k > 1:
            pair_range = b.node("Range", [b.const(0, "int64"), b.node("Size", [pair_experts]), b.const(1, "int64")])
            pair_tokens = b.node("Div", [pair_range, b.const(k, "int64")])
            rows = b.node("Gather", [tokens, pair_tokens], axis=0)
        routed_in = b.node("Mul", [rows, b.node("Reshape", [scores, b.int64s(-1, 1)])])     # [N*k, H]
        zero = onnx.helper.make_tensor("zero", ONNX_DTYPES[dtype], [1], [0])
        acc = b.node("ConstantOfShape", [b.node("Shape", [tokens])], value=zero)
        for i in range(experts.experts):
            pairs = b.node("Reshape", [b.node("NonZero", [b.node("Equal", [pair_experts, b.const(i, "int64")])]),
                                       b.int64s(-1)])                                  # [M]
            out = experts.mlp(b, b.node("Gather", [routed_in, pairs], axis=0), i)
            targets = pairs if pair_tokens is None else b.node("Gather", [pair_tokens, pairs], axis=0)
            # ScatterElements, not ScatterND: TensorRT's parser takes no ScatterND reduction (l4compile/trt)
            rows = b.node("Expand", [b.node("Unsqueeze", [targets, b.int64s(1)]), b.node("Shape", [out])])
            acc = b.node("ScatterElements", [acc, rows, out], axis=0, reduction="add")
        return acc


def _ort_qmoe(b, experts: _ExpertsNBits, x: str, logits: str, dtype: str) -> str:
    """Top-1 through onnxruntime's com.microsoft QMoE (4- or 8-bit blocks, CPU and CUDA), routed as
    `moe_dispatch`'s impl "ort" routes MoE (ort_routing): the input pre-scaled by sigmoid(top logit), the
    chosen expert's routing weight exactly 1.0; SwiGLU with alpha 1, beta 0 is silu(gate) * up."""
    e, h, f = experts.experts, experts.hidden, experts.inner
    routed_in, router = ort_routing(b, x, logits, dtype, e)
    # QMoE wants fc1 rows gate and up interleaved (swiglu_fusion 1): a row permutation of the codes
    # and scales, folded by onnxruntime when the session is created.
    interleave = b.const(np.stack([np.arange(f), f + np.arange(f)], axis=1).reshape(-1), "int64")
    fc1 = b.node("Reshape", [b.node("Gather", [experts.gate_up, interleave], axis=1), b.int64s(e, 2 * f, -1)])
    fc1_scales = b.node("Gather", [experts.gate_up_scale, interleave], axis=1)
    fc2 = b.node("Reshape", [experts.down, b.int64s(e, h, -1)])
    return b.node("QMoE", [routed_in, router, fc1, fc1_scales, "", fc2, experts.down_scale], domain=MS_DOMAIN, k=1,
                  activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0, activation_alpha=1.0,
                  activation_beta=0.0, expert_weight_bits=experts.nbits["bits"], block_size=experts.nbits["block_size"],
                  accuracy_level=experts.nbits["accuracy_level"])


@register
class EmbeddingNBits(Op):
    """table[ids] for a table stored as 4- or 8-bit blocks along the hidden axis, in MatMulNBits' layout
    (codes [V, H/block, block * bits / 8], scales [V, H/block]: the same tensors serve a tied lm_head's
    MatMulNBits). ONNX: onnxruntime's com.microsoft GatherBlockQuantized (default zero points 8 and 128,
    as MatMulNBits), which dequantizes only the gathered rows."""

    name = "embedding_nbits"

    def infer(self, inputs, attrs):
        ids, q, scale = inputs
        block, bits = attrs["block_size"], attrs.get("bits", 4)
        expect(ids.dtype == "int64", self.name, f"ids must be int64, got {ids}")
        expect(q.rank == 3 and bits in (4, 8), self.name, f"codes {q} must be [V, blocks, bytes], bits 4 or 8")
        _check_nbits(self.name, q, scale, q.shape[1] * block, attrs)
        return [TensorType(scale.dtype, ids.shape + (q.shape[1] * block,))]

    def torch(self, torch, inputs, attrs):
        ids, q, scale = inputs
        block = attrs["block_size"]
        return [unpack_nbits(torch, q[ids], scale[ids], q.shape[1] * block, block, attrs.get("bits", 4))]

    def onnx(self, b, inputs, attrs, types):
        ids, q, scale = inputs
        rank, hidden = types[0].rank, types[1].shape[1] * attrs["block_size"]
        scales = b.node("Unsqueeze", [scale, b.int64s(-1)])                          # [V, blocks, 1]
        rows = b.node("GatherBlockQuantized", [q, ids, scales], domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                      block_size=attrs["block_size"], bits=attrs.get("bits", 4))   # [..., blocks, block]
        return [b.node("Reshape", [rows, b.int64s(*([0] * rank), hidden)])]
