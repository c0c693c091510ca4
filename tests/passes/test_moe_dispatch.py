"""MoE dispatch fusion, before / expected, then numerically for every lowering; its precondition refused."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.errors import PassError
from l4compile.ir import Graph, TensorType, print_ir
from l4compile.passes import PassManager
from l4compile.passes.moe_dispatch import MoEDispatch
from tests.passes.conftest import run_onnx, run_torch

H, E, F = 8, 4, 8


def moe_block(top_k: int = 1) -> tuple:
    """The lowered form of one MoE block (router -> router_scores -> moe_experts), plus a shared expert."""
    g = Graph("moe")
    x = g.add_input("x", TensorType("float32", ("batch", "seq", H)))
    router = g.add_const("router", np.random.default_rng(1).standard_normal((H, E)).astype(np.float32))
    gate_up = g.add_const("gate_up", np.random.default_rng(2).standard_normal((E, H, 2 * F)).astype(np.float32) / 3)
    down = g.add_const("down", np.random.default_rng(3).standard_normal((E, F, H)).astype(np.float32) / 3)
    logits = g.op("linear", [x, router], name="ff.router")
    return g, x, logits, gate_up, down, top_k


def before(top_k: int = 1) -> Graph:
    g, x, logits, gate_up, down, top_k = moe_block(top_k)
    scores = g.op("router_scores", [logits], name="ff.scores", top_k=top_k)
    g.set_outputs([g.op("add", [x, g.op("moe_experts", [x, scores, gate_up, down], name="ff.experts")], name="out")])
    return g


def expected(impl: str, top_k: int = 1) -> Graph:
    g, x, logits, gate_up, down, top_k = moe_block(top_k)
    routed = g.op("moe_dispatch", [x, logits, gate_up, down], name="ff.dispatch", top_k=top_k, impl=impl,
                  gather_max_tokens=8)
    g.set_outputs([g.op("add", [x, routed], name="out")])
    return g


def test_before_expected():
    g = before()
    [(_, result)] = PassManager([MoEDispatch(impl="gather")]).run(g)
    assert result.changed and result.stats == {"blocks": 1}
    assert print_ir(g) == print_ir(expected("gather"))


@pytest.mark.parametrize("impl", ["gather", "grouped", "auto", "ort"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tokens", [(1, 1), (2, 3), (3, 7)])  # decode, a few tokens, more than gather_max_tokens
def test_outputs_equal_the_unfused_form(impl, top_k, tokens):
    x = np.random.default_rng(sum(tokens)).standard_normal(tokens + (H,)).astype(np.float32)
    g = before(top_k)
    want_torch, want_onnx = run_torch(g, {"x": x}), run_onnx(g, {"x": x})
    [(_, result)] = PassManager([MoEDispatch(impl=impl, gather_max_tokens=4)]).run(g)
    assert result.stats["blocks"] == 1
    assert result.stats.get("fallback_grouped", 0) == (1 if impl == "ort" and top_k == 2 else 0)
    np.testing.assert_allclose(run_torch(g, {"x": x})[0], want_torch[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(run_onnx(g, {"x": x})[0], want_onnx[0], atol=1e-5, rtol=0)


def test_ort_lowering_uses_the_contrib_op_and_standard_ones_do_not():
    from l4compile.emit.onnx_emitter import emit_onnx

    def domains(impl):
        g = before()
        MoEDispatch(impl=impl).run(g)
        model = emit_onnx(g, None, None).model
        return {n.domain for n in model.graph.node if n.domain}
    assert domains("ort") == {"com.microsoft"}
    assert domains("grouped") == domains("gather") == domains("auto") == set()


def test_precondition_refused_on_already_dispatched_blocks():
    g = before()
    PassManager([MoEDispatch()]).run(g)
    with pytest.raises(PassError, match=r"pass moe-dispatch refused: it requires moe-unfused .* which does not hold: "
                                        r"1 MoE block\(s\) are already dispatched \(ff.dispatch\)"):
        PassManager([MoEDispatch()]).run(g)


def test_blocks_without_llama4_routing_are_left_alone():
    """moe_experts fed by anything but router_scores is not the pattern: nothing changes."""
    g, x, logits, gate_up, down, _ = moe_block()
    g.set_outputs([g.op("moe_experts", [x, logits, gate_up, down], name="ff.experts")])
    result = MoEDispatch().run(g)
    assert not result.changed and result.stats == {"blocks": 0}


@pytest.mark.parametrize("parts", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [(1, 1), (3, 7)])   # decode (one token on one expert), a prefill
def test_ort_parts_split_each_expert_and_keep_the_outputs(parts, tokens):
    from l4compile.emit.onnx_emitter import emit_onnx
    x = np.random.default_rng(sum(tokens)).standard_normal(tokens + (H,)).astype(np.float32)
    g = before()
    want = run_onnx(g, {"x": x})[0]
    MoEDispatch(impl="ort", ort_parts=parts).run(g)
    [moe] = [n for n in emit_onnx(g, None, None).model.graph.node if n.op_type == "MoE"]
    assert {a.name: a.i for a in moe.attribute}["k"] == parts   # every part of the chosen expert is routed
    np.testing.assert_allclose(run_onnx(g, {"x": x})[0], want, atol=1e-5, rtol=0)


def test_ort_parts_are_a_power_of_two_dividing_the_inner_size():
    from l4compile.ir.ops_moe_dispatch import ort_parts
    assert [ort_parts(8192, p) for p in (1, 2, 3, 4, 8)] == [1, 2, 2, 4, 8]
    assert ort_parts(6, 4) == 2 and ort_parts(7, 4) == 1 and ort_parts(384, 8) == 8


def test_ort_parts_must_be_a_positive_integer():
    with pytest.raises(PassError, match="ort_parts must be a positive integer, got 0"):
        MoEDispatch(impl="ort", ort_parts=0)
