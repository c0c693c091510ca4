"""MoE dispatch: each token's work touches only its selected experts (the fused form of an MoE block).

`moe_dispatch` computes exactly what `router_scores` + `moe_experts` compute (Llama 4: top-k
router logits, score = sigmoid(logit), the score scales the expert's *input*), but from the
router logits, expert by selected expert instead of every expert on every token. Its ONNX
lowering is chosen by the `impl` attribute:

  gather   each token gathers its experts' weights and runs them: standard ops, best for a few
           tokens (decode); gathered weights grow with tokens x expert size, so not for prefill.
  grouped  an ONNX Loop over the experts that received tokens: each runs once on its own tokens
           (found with NonZero) and scatter-adds its rows back. Standard ops, exact cost for any
           token count (prefill and decode).
  auto     an If on the token count: gather up to `gather_max_tokens` tokens, grouped above.
  ort      onnxruntime's com.microsoft MoE (top-1 only): x is pre-scaled by sigmoid(top logit), each
           expert runs as `ort_parts` parts of its inner axis (so that the op's threads share one
           token's expert), all parts of the selected expert routed with weight exactly 1/parts and
           the sum scaled back by parts; its SwiGLU (alpha 1, beta 0, no limit) is silu(gate) * up.
"""

from __future__ import annotations

import onnx

from l4compile.ir.op import ONNX_DTYPES, OnnxBuilder, Op, expect, get_op, register
from l4compile.ir.types import TensorType

IMPLS = ("gather", "grouped", "auto", "ort")


@register
class MoEDispatch(Op):
    """x [B, S, H], router logits [B, S, E], gate_up [E, H, 2F] (gate then up), down [E, F, H] -> [B, S, H].

    out = sum over the top_k experts e of each token: expert_e(x * sigmoid(logit_e)).

    With `expert_offset` (expert parallelism, l4compile.passes.shard), gate_up and down hold only the
    experts [offset, offset + E_local) of the E the router scores: selection is over all E, and a
    token's experts outside this block contribute nothing here (another rank runs them).
    """

    name = "moe_dispatch"

    def infer(self, inputs, attrs):
        logits = inputs[1]
        offset = attrs.get("expert_offset", 0)
        # the same shapes as moe_experts, with logits where scores were
        out = get_op("moe_experts").infer(inputs, {k: v for k, v in attrs.items() if k == "expert_offset"})
        e = logits.shape[-1]
        expect(1 <= attrs["top_k"] <= e, self.name, f"top_k {attrs['top_k']} of {e} experts")
        expect(attrs["impl"] in IMPLS, self.name, f"impl {attrs['impl']!r} is not one of {IMPLS}")
        expect(attrs["impl"] != "ort" or attrs["top_k"] == 1, self.name, "impl 'ort' routes top-1 only")
        expect(attrs["impl"] != "ort" or inputs[2].shape[0] == e, self.name,
               "impl 'ort' runs every expert of the router (no expert_offset block)")
        return out

    def weight_inputs(self, attrs):
        return {2: 1, 3: 1}  # gate_up [E, H, 2F] and down [E, F, H] reduce over their middle axis

    def torch(self, torch, inputs, attrs):
        x, logits, gate_up, down = inputs
        tokens, logits = x.reshape(-1, x.shape[-1]), logits.reshape(-1, logits.shape[-1])
        top_value, top_index = torch.topk(logits, attrs["top_k"], dim=-1)
        scores = torch.sigmoid(top_value.float()).to(x.dtype)
        out = torch.zeros_like(tokens)
        offset = attrs.get("expert_offset", 0)
        for e in top_index.unique().tolist():
            if not offset <= e < offset + gate_up.shape[0]:
                continue   # another rank's expert
            rows, slot = (top_index == e).nonzero(as_tuple=True)
            gate, up = ((tokens[rows] * scores[rows, slot, None]) @ gate_up[e - offset]).chunk(2, dim=-1)
            out.index_add_(0, rows, (torch.nn.functional.silu(gate) * up) @ down[e - offset])
        return [out.reshape(x.shape)]

    def onnx(self, b, inputs, attrs, types):
        if attrs["impl"] == "ort":
            return [_ort_moe(b, inputs, attrs, types)]
        lowering = {"gather": _gather, "grouped": _grouped, "auto": _auto}[attrs["impl"]]
        out = lowering(b, _Routing(b, inputs, attrs, types))
        return [b.node("Reshape", [out, b.node("Shape", [inputs[0]])])]


class _Routing:
    """What every lowering starts from: tokens [N, H], each token's experts [N, k] and scores [N, k]."""

    def __init__(self, b: OnnxBuilder, inputs: list[str], attrs: dict, types: list[TensorType]) -> None:
        x, logits, self.gate_up, self.down = inputs
        self.dtype = types[0].dtype
        self.experts_n, self.hidden, f2 = types[2].shape
        self.inner = f2 // 2
        self.top_k = attrs["top_k"]
        self.offset = attrs.get("expert_offset", 0)
        self.router_n = types[1].shape[-1]
        self.gather_max_tokens = attrs.get("gather_max_tokens", 8)
        self.tokens = b.node("Reshape", [x, b.int64s(-1, self.hidden)])
        self.logits = b.node("Reshape", [logits, b.int64s(-1, self.router_n)])
        selecting = self.logits if self.dtype == "float32" else b.node("Cast", [self.logits], to=1)
        top_value, self.experts = b.node("TopK", [selecting, b.int64s(self.top_k)], n_out=2, axis=-1)
        self.scores = b.node("Sigmoid", [top_value])
        if self.dtype != "float32":
            self.scores = b.node("Cast", [self.scores], to=ONNX_DTYPES[self.dtype])

    def swiglu_mlp(self, b: OnnxBuilder, rows: str, gate_up: str, down: str) -> str:
        """down(silu(gate) * up) of rows @ gate_up, through silu_mul's own lowering."""
        gate, up = b.node("Split", [b.node("MatMul", [rows, gate_up]), b.int64s(self.inner, self.inner)],
                          n_out=2, axis=-1)
        t = TensorType(self.dtype, ("rows", self.inner))
        act = get_op("silu_mul").onnx(b, [gate, up], {}, [t, t])[0]
        return b.node("MatMul", [act, down])


def _gather(b: OnnxBuilder, r: _Routing) -> str:
    experts, scores = r.experts, r.scores
    if r.offset or r.experts_n != r.router_n:   # a block of experts: others' tokens get score 0 here
        local = b.node("Sub", [experts, b.const(r.offset, "int64")])
        mine = b.node("And", [b.node("GreaterOrEqual", [local, b.const(0, "int64")]),
                              b.node("Less", [local, b.const(r.experts_n, "int64")])])
        experts = b.node("Where", [mine, local, b.const(0, "int64")])
        scores = b.node("Mul", [scores, b.node("Cast", [mine], to=ONNX_DTYPES[r.dtype])])
    routed_in = b.node("Mul", [b.node("Unsqueeze", [r.tokens, b.int64s(1, 2)]),          # [N, 1, 1, H]
                               b.node("Unsqueeze", [scores, b.int64s(2, 3)])])           # [N, k, 1, 1]
    gate_up = b.node("Gather", [r.gate_up, experts], axis=0)                              # [N, k, H, 2F]
    down = b.node("Gather", [r.down, experts], axis=0)                                    # [N, k, F, H]
    out = r.swiglu_mlp(b, routed_in, gate_up, down)                                       # [N, k, 1, H]
    return b.node("ReduceSum", [out, b.int64s(1, 2)], keepdims=0)


def _grouped(b: OnnxBuilder, r: _Routing) -> str:
    pair_experts = b.node("Reshape", [r.experts, b.int64s(-1)])                          # [N*k] token-major
    pair_scores = b.node("Reshape", [r.scores, b.int64s(-1, 1)])
    pair_tokens = None
    rows = r.tokens
    if r.top_k > 1:
        pairs = b.node("Size", [pair_experts])
        pair_tokens = b.node("Div", [b.node("Range", [b.const(0, "int64"), pairs, b.const(1, "int64")]),
                                     b.const(r.top_k, "int64")])
        rows = b.node("Gather", [r.tokens, pair_tokens], axis=0)
    routed_in = b.node("Mul", [rows, pair_scores])                                        # [N*k, H]
    hits = b.node("Equal", [b.node("Unsqueeze", [pair_experts, b.int64s(1)]),
                            b.const(list(range(r.offset, r.offset + r.experts_n)), "int64")])  # [N*k, E]
    used = b.node("ReduceMax", [b.node("Cast", [hits], to=ONNX_DTYPES["int32"]), b.int64s(0)], keepdims=0)
    present = b.node("Reshape", [b.node("NonZero", [used]), b.int64s(-1)])                # experts with tokens
    if r.offset:   # present holds indices into this rank's block; pairs carry the router's indices
        pair_experts = b.node("Sub", [pair_experts, b.const(r.offset, "int64")])
    zeros = _filled(b, r.tokens, r.dtype, 0)
    step, cond, acc = b.fresh("step"), b.fresh("cond"), b.fresh("acc")
    with b.capture() as body_nodes:
        expert = b.node("Gather", [present, step], axis=0)
        pairs_of_expert = b.node("Reshape", [b.node("NonZero", [b.node("Equal", [pair_experts, expert])]),
                                             b.int64s(-1)])                               # [M]
        expert_rows = b.node("Gather", [routed_in, pairs_of_expert], axis=0)             # [M, H]
        out = r.swiglu_mlp(b, expert_rows, b.node("Gather", [r.gate_up, expert], axis=0),
                           b.node("Gather", [r.down, expert], axis=0))                   # [M, H]
        targets = pairs_of_expert if pair_tokens is None else b.node("Gather", [pair_tokens, pairs_of_expert], axis=0)
        # A token meets an expert at most once, so its row is read, added to and written back: no
        # scatter reduction, which TensorRT's parser (ScatterND) and onnxruntime's CPU float16 lack.
        rows = b.node("Expand", [b.node("Unsqueeze", [targets, b.int64s(1)]), b.node("Shape", [out])])
        summed = b.node("Add", [b.node("Gather", [acc, targets], axis=0), out])
        acc_out = b.node("ScatterElements", [acc, rows, summed], axis=0)
        cond_out = b.node("Identity", [cond])
    elem = ONNX_DTYPES[r.dtype]
    info = onnx.helper.make_tensor_value_info
    body = onnx.helper.make_graph(
        body_nodes, b.fresh("experts_loop"),
        [info(step, onnx.TensorProto.INT64, []), info(cond, onnx.TensorProto.BOOL, []),
         info(acc, elem, ["tokens", r.hidden])],
        [info(cond_out, onnx.TensorProto.BOOL, []), info(acc_out, elem, ["tokens", r.hidden])])
    return b.node("Loop", [b.node("Size", [present]), "", zeros], body=body)


def _auto(b: OnnxBuilder, r: _Routing) -> str:
    few = b.node("LessOrEqual", [b.node("Gather", [b.node("Shape", [r.tokens]), b.const(0, "int64")], axis=0),
                                 b.const(r.gather_max_tokens, "int64")])
    branches = []
    for lower in (_gather, _grouped):
        with b.capture() as nodes:
            out = lower(b, r)
        info = onnx.helper.make_tensor_value_info(out, ONNX_DTYPES[r.dtype], ["tokens", r.hidden])
        branches.append(onnx.helper.make_graph(nodes, b.fresh(lower.__name__.strip("_")), [], [info]))
    return b.node("If", [few], then_branch=branches[0], else_branch=branches[1])


def _ort_moe(b: OnnxBuilder, inputs: list[str], attrs: dict, types: list[TensorType]) -> str:
    x, logits, gate_up, down = inputs
    e, h, f2 = types[2].shape
    f, s = f2 // 2, ort_parts(f2 // 2, attrs.get("ort_parts", 1))
    # onnxruntime's CPU MoE runs each expert on one thread (its threads split the experts), so a
    # decode step, one token on one expert, would use one core. Each expert is split into `s` parts
    # along its inner axis (part p of expert e is op expert p*E + e; a SwiGLU MLP is the sum of its
    # parts), all `s` parts are routed (k = s), and the op's threads share the token's work. Each
    # part's weight is softmax = 1/s exactly (s is a power of two), and the sum is scaled back by s.
    routed_in, router = ort_routing(b, x, logits, types[0].dtype, e, repeat=s)
    # The op wants fc1 [E', 2F', H] with gate and up interleaved per row, fc2 [E', H, F'] (E' = s*E
    # parts of F' = F/s); onnxruntime folds these reshapes and transposes of the weights once, when
    # the session is created.
    fc1 = b.node("Reshape", [b.node("Transpose", [b.node("Reshape", [gate_up, b.int64s(e, h, 2, s, f // s)])],
                                    perm=[3, 0, 4, 2, 1]), b.int64s(s * e, 2 * f // s, h)])
    fc2 = b.node("Reshape", [b.node("Transpose", [b.node("Reshape", [down, b.int64s(e, s, f // s, h)])],
                                    perm=[1, 0, 3, 2]), b.int64s(s * e, h, f // s)])
    out = b.node("MoE", [routed_in, router, fc1, "", fc2], domain="com.microsoft", k=s,
                 activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0,
                 activation_alpha=1.0, activation_beta=0.0)
    return out if s == 1 else b.node("Mul", [out, b.const(float(s), types[0].dtype)])


def ort_routing(b: OnnxBuilder, x: str, logits: str, dtype: str, experts: int, repeat: int = 1) -> tuple[str, str]:
    """Top-1 routing as onnxruntime's MoE and QMoE (normalize_routing_weights 0) compute Llama 4's:
    x [B, S, H], logits [B, S, E] -> the op's input x * sigmoid(top logit) [B, S, H] and router values
    [B*S, repeat*E]: 0 at the chosen expert (and at its copies e + r*E), -inf elsewhere, so that the
    op's softmax gives each of the `repeat` routes the weight 1/repeat exactly (repeat a power of two).
    Ties go to the lowest expert index (ONNX TopK's rule)."""
    selecting = logits if dtype == "float32" else b.node("Cast", [logits], to=1)   # TopK has no bfloat16 kernel
    top_value, chosen = b.node("TopK", [selecting, b.int64s(1)], n_out=2, axis=-1)  # [B, S, 1]
    scores = b.node("Sigmoid", [top_value])
    if dtype != "float32":
        scores = b.node("Cast", [scores], to=ONNX_DTYPES[dtype])
    routed_in = b.node("Mul", [x, scores])
    router = b.node("OneHot", [chosen, b.const(experts, "int64"), b.const([float("-inf"), 0.0], "float32")],
                    axis=-1)                                                           # [B, S, 1, E]
    router = b.node("Reshape", [router, b.int64s(-1, experts)])
    if repeat > 1:
        router = b.node("Tile", [router, b.int64s(1, repeat)])
    if dtype != "float32":
        router = b.node("Cast", [router], to=ONNX_DTYPES[dtype])
    return routed_in, router


def ort_parts(inner: int, parts: int) -> int:
    """The largest power of two <= parts that divides the expert inner size."""
    s = 1
    while s * 2 <= parts and inner % (s * 2) == 0:
        s *= 2
    return s


def _filled(b: OnnxBuilder, like: str, dtype: str, value: float) -> str:
    """A tensor of `like`'s shape filled with `value`."""
    fill = onnx.helper.make_tensor("value", ONNX_DTYPES[dtype], [1], [value])
    return b.node("ConstantOfShape", [b.node("Shape", [like])], value=fill)
