"""skip-rms-norm: before / expected, numerically against the unfused form, refusals."""

from __future__ import annotations

import numpy as np

from l4compile.emit.onnx_emitter import emit_onnx
from l4compile.ir import Graph, TensorType, print_ir
from l4compile.passes import PassManager
from l4compile.passes.skip_rms_norm import SkipRMSNorm
from tests.passes.conftest import run_onnx, run_torch

H = 16


def residual_block(dtype: str = "float32", skip_shape: tuple = ("batch", "seq", H)) -> Graph:
    """x + a -> norm (read by a projection), and the sum read again by the next residual add."""
    g = Graph("residual")
    x = g.add_input("x", TensorType(dtype, ("batch", "seq", H)))
    a = g.add_input("a", TensorType(dtype, skip_shape))
    w = g.add_const("w", np.linspace(0.5, 1.5, H).astype(dtype))
    h = g.op("add", [x, a], name="residual")
    normed = g.op("rms_norm", [h, w], name="norm", eps=1e-5)
    g.set_outputs([g.op("add", [h, normed], name="next_residual")])
    return g


def expected() -> Graph:
    g = Graph("residual")
    x = g.add_input("x", TensorType("float32", ("batch", "seq", H)))
    a = g.add_input("a", TensorType("float32", ("batch", "seq", H)))
    w = g.add_const("w", np.linspace(0.5, 1.5, H).astype(np.float32))
    normed, h = g.op("skip_rms_norm", [x, a, w], name="norm.1", n_out=2, eps=1e-5)
    g.set_outputs([g.op("add", [h, normed], name="next_residual")])
    return g


def feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal((2, 3, H)).astype(np.float32) for k in ("x", "a")}


def test_before_expected():
    g = residual_block()
    [(_, result)] = PassManager([SkipRMSNorm()]).run(g)
    assert result.stats == {"nodes": 1, "refused": 0}
    assert print_ir(g) == print_ir(expected())


def test_outputs_unchanged_and_one_onnx_node():
    g = residual_block()
    want = run_torch(g, feeds())
    SkipRMSNorm().run(g)
    for got in (run_torch(g, feeds()), run_onnx(g, feeds())):
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    ops = [n.op_type for n in emit_onnx(g, None, None).model.graph.node]
    assert ops[:2] == ["SkipSimplifiedLayerNormalization", "Add"] and "Pow" not in ops   # (then the output's Identity)


def test_refuses_low_precision_and_broadcasting_adds():
    for g in (residual_block("float16"), residual_block(skip_shape=(1, 1, H))):
        before = print_ir(g)
        result = PassManager([SkipRMSNorm()]).run(g)[0][1]
        assert not result.changed and result.stats == {"nodes": 0, "refused": 1}
        assert print_ir(g) == before


def test_a_norm_of_no_add_is_left_alone():
    g = Graph("plain")
    x = g.add_input("x", TensorType("float32", ("batch", "seq", H)))
    g.set_outputs([g.op("rms_norm", [x, g.add_const("w", np.ones(H, np.float32))], name="norm", eps=1e-5)])
    before = print_ir(g)
    assert SkipRMSNorm().run(g).stats == {"nodes": 0, "refused": 0}
    assert print_ir(g) == before
