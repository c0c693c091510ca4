"""MoE ops in their straightforward form (the dispatch-fusion pass rewrites them).

Llama 4 routing: top-k router logits, score = sigmoid(logit) for the selected
experts and 0 for the others, and the score scales the expert's *input*.
"""

from __future__ import annotations

import math

import onnx.helper

from l4compile.ir.op import ONNX_DTYPES, Op, expect, register


@register
class RouterScores(Op):
    """logits [..., E] -> scores [..., E]: sigmoid(logit) for the top_k experts, 0 elsewhere."""

    name = "router_scores"

    def infer(self, inputs, attrs):
        (logits,) = inputs
        expect(1 <= attrs["top_k"] <= logits.shape[-1], self.name, f"top_k {attrs['top_k']} of {logits.shape[-1]}")
        return [logits]

    def torch(self, torch, inputs, attrs):
        (logits,) = inputs
        top_value, top_index = torch.topk(logits, attrs["top_k"], dim=-1)
        scores = torch.full_like(logits, -math.inf).scatter_(-1, top_index, top_value)
        return [torch.sigmoid(scores.float()).to(logits.dtype)]

    def onnx(self, b, inputs, attrs, types):
        (logits,) = inputs
        low_precision = types[0].dtype != "float32"
        if low_precision:  # TopK has no bfloat16 kernel in the standard opset; selection is unchanged in float32
            logits = b.node("Cast", [logits], to=1)
        values, indices = b.node("TopK", [logits, b.int64s(attrs["top_k"])], n_out=2, axis=-1)
        fill = onnx.helper.make_tensor("fill", onnx.TensorProto.FLOAT, [1], [-math.inf])
        neg_inf = b.node("ConstantOfShape", [b.node("Shape", [logits])], value=fill)
        scores = b.node("Sigmoid", [b.node("ScatterElements", [neg_inf, indices, values], axis=-1)])
        if low_precision:
            scores = b.node("Cast", [scores], to=ONNX_DTYPES[types[0].dtype])
        return [scores]


@register
class MoEExperts(Op):
    """Every expert on every token, masked by its score: sum_e expert_e(x * score_e).

    x [B, S, H], scores [B, S, E], gate_up [E, H, 2F] (gate then up), down [E, F, H] -> [B, S, H].
    Cost grows with E (as in transformers); experts with score 0 contribute exactly 0. With
    `expert_offset`, gate_up and down hold the block of experts [offset, offset + E_local) only.
    """

    name = "moe_experts"

    def infer(self, inputs, attrs):
        x, scores, gate_up, down = inputs
        e, h, f2 = gate_up.shape
        offset = attrs.get("expert_offset", 0)
        block = "expert_offset" in attrs   # a rank's block of the router's experts (expert parallelism)
        expect(x.shape[-1] == h and scores.shape[-1] >= offset + e and (block or scores.shape[-1] == e),
               self.name, f"x {x}, scores {scores}, gate_up {gate_up}, expert_offset {offset}")
        expect(down.shape == (e, f2 // 2, h), self.name, f"down {down} does not match gate_up {gate_up}")
        return [x]

    def torch(self, torch, inputs, attrs):
        x, scores, gate_up, down = inputs
        hidden = x.shape[-1]
        offset = attrs.get("expert_offset", 0)
        scores = scores[..., offset:offset + gate_up.shape[0]]
        tokens = x.reshape(-1, hidden)
        routed_in = tokens[None, :, :] * scores.reshape(-1, scores.shape[-1]).t()[:, :, None]
        gate, up = torch.bmm(routed_in, gate_up).chunk(2, dim=-1)
        routed_out = torch.bmm(up * torch.nn.functional.silu(gate), down)
        return [routed_out.sum(dim=0).reshape(x.shape)]

    def weight_inputs(self, attrs):
        return {2: 1, 3: 1}  # gate_up [E, H, 2F] and down [E, F, H] reduce over their middle axis

    def onnx(self, b, inputs, attrs, types):
        x, scores, gate_up, down = inputs
        e, h, f2 = types[2].shape
        offset = attrs.get("expert_offset", 0)
        if offset or types[1].shape[-1] != e:
            scores = b.node("Slice", [scores, b.int64s(offset), b.int64s(offset + e), b.int64s(-1)])
        tokens = b.node("Reshape", [x, b.int64s(1, -1, h)])                       # [1, T, H]
        per_expert = b.node("Transpose", [b.node("Reshape", [scores, b.int64s(-1, e)])], perm=[1, 0])
        routed_in = b.node("Mul", [tokens, b.node("Unsqueeze", [per_expert, b.int64s(-1)])])  # [E, T, H]
        gate, up = b.node("Split", [b.node("MatMul", [routed_in, gate_up]), b.int64s(f2 // 2, f2 // 2)],
                          n_out=2, axis=-1)
        act = b.node("Mul", [up, b.node("Mul", [gate, b.node("Sigmoid", [gate])])])
        summed = b.node("ReduceSum", [b.node("MatMul", [act, down]), b.int64s(0)], keepdims=0)
        return [b.node("Reshape", [summed, b.node("Shape", [x])])]
