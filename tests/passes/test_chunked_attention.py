"""Chunked-attention masking, before / expected, then numerically with and without a cache; refusals."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.errors import PassError
from l4compile.ir import Graph, TensorType, print_ir
from l4compile.passes import CommonSubexpressionElimination, PassManager
from l4compile.passes.chunked_attention import ChunkedAttention
from tests.passes.conftest import run_onnx, run_torch

CHUNK, HQ, HKV, D = 4, 4, 2, 8


def inputs(g: Graph) -> tuple[str, ...]:
    """Queries, keys after a cache (used as values too), and the query and key positions, as lowering makes them."""
    ids = g.add_input("ids", TensorType("int64", ("batch", "seq")))
    past_length = g.add_input("past_length", TensorType("int64", ()))
    past = g.add_input("past", TensorType("float32", ("past", "batch", HKV, D)))
    q = g.add_input("q", TensorType("float32", ("batch", "seq", HQ, D)))
    k = g.add_input("k", TensorType("float32", ("batch", "seq", HKV, D)))
    keys = g.op("kv_concat", [past, k], name="keys")
    positions = g.op("positions", [ids, past_length], name="positions")
    key_positions = g.op("key_positions", [past_length, past, ids], name="key_positions")
    return q, keys, positions, key_positions


def before() -> Graph:
    g = Graph("attn")
    q, keys, positions, key_positions = inputs(g)
    mask = g.op("attention_mask", [positions, key_positions], name="mask", chunk_size=CHUNK)
    outs = [g.op("attention", [q, keys, keys, mask], name=f"l{i}.attention", scale=0.5) for i in range(2)]
    g.set_outputs(outs)
    return g


def expected() -> Graph:
    g = Graph("attn")
    q, keys, positions, key_positions = inputs(g)
    masks = g.op("chunked_mask", [positions, key_positions], name="mask.blocks", n_out=3, chunk_size=CHUNK)
    outs = [g.op("chunked_attention", [q, keys, keys, *masks], name=f"l{i}.chunked_attention", chunk_size=CHUNK,
                 scale=0.5) for i in range(2)]
    g.set_outputs(outs)
    return g


def test_before_expected_with_one_mask_per_model():
    g = before()
    results = dict(PassManager([ChunkedAttention(), CommonSubexpressionElimination()]).run(g))
    assert results["chunked-attention"].stats == {"layers": 2, "refused": 0}
    assert results["cse"].stats["nodes_merged"] == 1   # the second layer's chunked_mask
    assert print_ir(g) == print_ir(expected())


def attention_feeds(past_length: int, cached: int, seq: int) -> dict[str, np.ndarray]:
    """Random inputs of the attention test graphs: a step of `seq` tokens after `cached` cached positions."""
    rng = np.random.default_rng(past_length * 100 + seq)
    return {"ids": np.zeros((2, seq), np.int64), "past_length": np.array(past_length, np.int64),
            "past": rng.standard_normal((cached, 2, HKV, D)).astype(np.float32),
            "q": rng.standard_normal((2, seq, HQ, D)).astype(np.float32),
            "k": rng.standard_normal((2, seq, HKV, D)).astype(np.float32)}


# (absolute position of the first new token, cached positions, new positions): prefill, decode inside a
# chunk, decode at a chunk start, a step that crosses chunk boundaries after a partial chunk, a long
# prefill after a partial chunk (the runtime's cache holds the current chunk only), and a cache that
# holds the whole history (not chunk-bounded)
@pytest.mark.parametrize("past_length, cached, seq", [(0, 0, 11), (9, 1, 1), (8, 0, 1), (7, 3, 6), (9, 1, 13),
                                                      (6, 6, 5)])
def test_outputs_equal_the_masked_form(past_length, cached, seq):
    feeds = attention_feeds(past_length, cached, seq)
    g = before()
    want = run_torch(g, feeds)
    PassManager([ChunkedAttention(), CommonSubexpressionElimination()]).run(g)
    for got in (run_torch(g, feeds), run_onnx(g, feeds)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_layers_with_positions_of_unknown_shape_keep_their_mask():
    """Blockwise attention needs contiguous runs of positions; positions given as an input may be anything."""
    g = Graph("attn")
    q = g.add_input("q", TensorType("float32", ("batch", "seq", HQ, D)))
    pos = g.add_input("pos", TensorType("int64", (1, "seq")))
    mask = g.op("attention_mask", [pos, pos], name="mask", chunk_size=CHUNK)
    g.set_outputs([g.op("attention", [q, q, q, mask], name="attention", scale=0.5)])
    before_text = print_ir(g)
    [(_, result)] = PassManager([ChunkedAttention()]).run(g)
    assert not result.changed and result.stats == {"layers": 0, "refused": 1}
    assert print_ir(g) == before_text


def test_global_layers_keep_their_mask():
    g = before()
    for node in g.nodes.values():
        if node.op == "attention_mask":
            node.attrs["chunk_size"] = 0
    assert not ChunkedAttention().run(g).changed


def test_precondition_refused_when_layers_already_attend_blockwise():
    g = before()
    PassManager([ChunkedAttention()]).run(g)
    with pytest.raises(PassError, match=r"pass chunked-attention refused: it requires attention-masked .* which does "
                                        r"not hold: 2 layer\(s\) already attend blockwise"):
        PassManager([ChunkedAttention()]).run(g)
