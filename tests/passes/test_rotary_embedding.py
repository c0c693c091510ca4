"""rotary-embedding: before / expected, numerically against the standard-op form, refusals."""

from __future__ import annotations

import numpy as np

from l4compile.ir import Graph, TensorType, print_ir
from l4compile.passes import PassManager
from l4compile.passes.rotary_embedding import RotaryEmbedding
from tests.passes.conftest import run_onnx, run_torch

H, D = 4, 8


def graph(per_row: bool = True, dtype: str = "float32", impl: str | None = None) -> Graph:
    """q [batch, seq, H, D] rotated by the angles of per-row positions (as the in-place lowering makes them)."""
    g = Graph("rope")
    ids = g.add_input("ids", TensorType("int64", ("batch", "seq")))
    offset = g.add_input("offset", TensorType("int64", ("batch",) if per_row else ()))
    q = g.add_input("q", TensorType(dtype, ("batch", "seq", H, D)))
    positions = g.op("positions", [ids, offset], name="positions")
    freqs = g.add_const("inv_freq", (10000.0 ** -(np.arange(0, D, 2) / D)).astype(np.float32))
    cos, sin = g.op("rope_angles", [positions, freqs], name="angles", n_out=2)
    attrs = {"impl": impl} if impl else {}
    g.set_outputs([g.op("rope", [q, cos, sin], name="q_rope", **attrs)])
    return g


def feeds(offsets) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"ids": np.zeros((2, 5), np.int64), "offset": np.array(offsets, np.int64),
            "q": rng.standard_normal((2, 5, H, D)).astype(np.float32)}


def test_before_expected():
    g = graph()
    [(_, result)] = PassManager([RotaryEmbedding()]).run(g)
    assert result.stats == {"nodes": 1, "refused": 0}
    assert print_ir(g).replace("q_rope.1", "q_rope") == print_ir(graph(impl="ort"))


def test_outputs_equal_the_standard_form_and_use_one_node():
    g = graph()
    want = run_torch(g, feeds([3, 70]))
    RotaryEmbedding().run(g)
    for got in (run_torch(g, feeds([3, 70])), run_onnx(g, feeds([3, 70]))):
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    from l4compile.emit.onnx_emitter import emit_onnx
    ops = [n.op_type for n in emit_onnx(g, None, None).model.graph.node]
    assert ops.count("RotaryEmbedding") == 1 and "Split" not in ops


def test_refuses_one_offset_for_the_batch_and_low_precision():
    for g in (graph(per_row=False), graph(dtype="float16")):
        before = print_ir(g)
        result = RotaryEmbedding().run(g)
        assert not result.changed and result.stats == {"nodes": 0, "refused": 1}
        assert print_ir(g) == before
