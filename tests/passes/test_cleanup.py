"""Clean-ups, before / expected: constant folding and common-subexpression elimination, then numerically."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.errors import PassError
from l4compile.ir import Graph, TensorType, print_ir, verify
from l4compile.passes import CommonSubexpressionElimination, ConstantFolding, PassManager
from tests.passes.conftest import run_onnx

X = TensorType("float32", ("n", 3))
TABLE = np.arange(3, dtype=np.float32)


def folding_before() -> Graph:
    g = Graph("fold")
    x = g.add_input("x", X)
    table = g.add_const("table", TABLE)
    doubled = g.op("add", [table, table], name="doubled")      # constant: folded
    g.set_outputs([g.op("mul", [x, doubled], name="scaled")])  # reads an input: stays
    return g


def test_constant_folding():
    g = folding_before()
    feeds = {"x": np.ones((2, 3), np.float32)}
    want = run_onnx(g, feeds)
    result = PassManager([ConstantFolding()]).run(g)[0][1]
    assert result.changed and result.stats == {"nodes_folded": 1, "left_computed": 0}
    expected = Graph("fold")
    x = expected.add_input("x", X)
    expected.add_const("table", TABLE)
    expected.add_const("doubled", 2 * TABLE)
    expected.set_outputs([expected.op("mul", [x, "doubled"], name="scaled")])
    assert print_ir(g) == print_ir(expected)
    np.testing.assert_array_equal(g.values["doubled"].data, 2 * TABLE)
    np.testing.assert_array_equal(run_onnx(g, feeds)[0], want[0])


def test_constant_folding_leaves_large_results_computed():
    g = folding_before()
    result = ConstantFolding(max_bytes=8).run(g)
    assert not result.changed and result.stats == {"nodes_folded": 0, "left_computed": 1}


def masks_per_layer() -> Graph:
    """Two layers that each compute the same mask from the same positions (what a per-layer rewrite leaves)."""
    g = Graph("masks")
    ids = g.add_input("ids", TensorType("int64", ("batch", "seq")))
    positions = g.op("positions", [ids], name="positions")
    outs = []
    for layer in range(2):
        mask = g.op("attention_mask", [positions, positions], name=f"mask.{layer}", chunk_size=4)
        outs.append(g.op("add", [mask, mask], name=f"use.{layer}"))
    g.add_const("one", np.ones(2, np.float32))
    g.add_const("one_again", np.ones(2, np.float32))
    g.set_outputs(outs)
    return g


def test_cse_computes_a_mask_once_per_model():
    g = masks_per_layer()
    feeds = {"ids": np.zeros((1, 9), np.int64)}
    want = run_onnx(g, feeds)
    result = CommonSubexpressionElimination().run(g)
    assert result.stats == {"nodes_merged": 1, "consts_merged": 1}
    verify(g)
    expected = Graph("masks")
    ids = expected.add_input("ids", TensorType("int64", ("batch", "seq")))
    positions = expected.op("positions", [ids], name="positions")
    mask = expected.op("attention_mask", [positions, positions], name="mask.0", chunk_size=4)
    expected.add_const("one", np.ones(2, np.float32))
    expected.set_outputs([expected.op("add", [mask, mask], name=f"use.{layer}") for layer in range(2)])
    assert print_ir(g) == print_ir(expected)
    for got, ref in zip(run_onnx(g, feeds), want):
        np.testing.assert_array_equal(got, ref)
    assert not CommonSubexpressionElimination().run(g).changed


def test_cse_keeps_distinct_graph_outputs():
    g = masks_per_layer()
    g.set_outputs(["mask.0", "mask.1"])
    CommonSubexpressionElimination().run(g)
    assert {"mask.0", "mask.1"} <= set(g.nodes)


def test_cleanups_have_no_preconditions_to_refuse():
    # Constant folding, CSE and DCE apply to any graph; the passes with preconditions
    # (moe-dispatch, chunked-attention) test their refusals in their own files.
    for p in (ConstantFolding(), CommonSubexpressionElimination()):
        assert p.requires == ()
    with pytest.raises(PassError):
        from l4compile.passes import make_pass
        make_pass("cse", {"aggressive": True})
