"""Expert parallelism at the op level: the MoE ops over a block of experts ([offset, offset + E_local) of the
router's E), summed over the blocks, equal the op over every expert, in torch and in each ONNX lowering;
and all_reduce's lowering is TensorRT's DistCollective."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from l4compile.emit.onnx_emitter import emit_onnx
from l4compile.errors import IRError
from l4compile.ir import Graph
from l4compile.ir.op import get_op
from l4compile.ir.types import TensorType

E, H, F, BLOCKS = 8, 16, 8, 4


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, H), dtype=np.float32)
    logits = rng.standard_normal((2, 5, E), dtype=np.float32)
    gate_up = rng.standard_normal((E, H, 2 * F), dtype=np.float32) / 4
    down = rng.standard_normal((E, F, H), dtype=np.float32) / 4
    return x, logits, gate_up, down


def _block_graph(op: str, gate_up: np.ndarray, down: np.ndarray, offset: int | None, **attrs) -> Graph:
    g = Graph("moe-block")
    x = g.add_input("x", TensorType("float32", ("batch", "seq", H)))
    router = g.add_input("router", TensorType("float32", ("batch", "seq", E)))
    if op == "moe_experts":
        router = g.op("router_scores", [router], name="scores", top_k=attrs.pop("top_k"))
    extra = {} if offset is None else {"expert_offset": offset}
    out = g.op(op, [x, router, g.add_const("gate_up", gate_up), g.add_const("down", down)], name="moe",
               **attrs, **extra)
    g.set_outputs([out])
    return g


def _run(graph: Graph, x, logits) -> np.ndarray:
    model = emit_onnx(graph, None, None).model
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "router": logits})[0]


@pytest.mark.parametrize("op,attrs", [("moe_dispatch", {"impl": "grouped", "top_k": 1}),
                                      ("moe_dispatch", {"impl": "gather", "top_k": 2}),
                                      ("moe_dispatch", {"impl": "auto", "top_k": 1, "gather_max_tokens": 4}),
                                      ("moe_experts", {"top_k": 2})])
def test_blocks_of_experts_sum_to_every_expert(op, attrs):
    x, logits, gate_up, down = _case()
    full = _run(_block_graph(op, gate_up, down, None, **dict(attrs)), x, logits)
    n = E // BLOCKS
    blocks = [_block_graph(op, gate_up[b * n:(b + 1) * n], down[b * n:(b + 1) * n], b * n, **dict(attrs))
              for b in range(BLOCKS)]
    np.testing.assert_allclose(sum(_run(g, x, logits) for g in blocks), full, atol=1e-5, rtol=0)
    node = next(n for n in blocks[1].nodes.values() if n.op == op)
    inputs = [torch.from_numpy(a) for a in (x, logits, gate_up[n:2 * n], down[n:2 * n])]
    if op == "moe_experts":
        inputs[1] = get_op("router_scores").torch(torch, [inputs[1]], {"top_k": attrs["top_k"]})[0]
    (block_torch,) = get_op(op).torch(torch, inputs, node.attrs)
    np.testing.assert_allclose(block_torch.numpy(), _run(blocks[1], x, logits), atol=1e-5, rtol=0)


def test_a_block_needs_its_offset_and_ort_runs_no_blocks():
    _, _, gate_up, down = _case()
    with pytest.raises(IRError, match="expert_offset"):
        _block_graph("moe_experts", gate_up[:2], down[:2], None, top_k=1)
    with pytest.raises(IRError, match="impl 'ort' runs every expert"):
        _block_graph("moe_dispatch", gate_up[:2], down[:2], 0, impl="ort", top_k=1)


def test_all_reduce_lowers_to_dist_collective_and_is_identity_for_one_rank():
    g = Graph("ar")
    x = g.add_input("x", TensorType("float32", ("n", 4)))
    g.set_outputs([g.op("all_reduce", [x], name="sum", ranks=4)])
    node = next(n for n in emit_onnx(g, None, None).model.graph.node if n.op_type == "DistCollective")
    attrs = {a.name: a for a in node.attribute}
    assert attrs["collective_operation"].s == b"all_reduce" and attrs["nb_rank"].i == 4 and node.domain == ""
    t = torch.ones(2, 4)
    assert get_op("all_reduce").torch(torch, [t], {"ranks": 1})[0] is t
    with pytest.raises(IRError, match="needs an initialised torch.distributed group"):
        get_op("all_reduce").torch(torch, [t], {"ranks": 4})
