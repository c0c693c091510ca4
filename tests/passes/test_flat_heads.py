"""flat-heads and attention-lengths on one attention layer over an in-place cache: before / expected
(structurally), outputs unchanged (torch reference and onnxruntime), cases left alone."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.emit.onnx_emitter import emit_onnx
from l4compile.ir import Graph, TensorType, print_ir
from l4compile.passes import PassManager
from l4compile.passes.attention_lengths import AttentionLengths
from l4compile.passes.flat_heads import FlatHeads
from tests.passes.conftest import run_onnx, run_torch

HQ, HKV, D, C = 4, 2, 8, 8


def layer(rope: bool, layers: int = 1, chunk: int = 0) -> Graph:
    """q, k, v projections [B, S, H*D] split into heads; rope (onnxruntime's) and qk norm on a RoPE layer,
    a per-position query scale on a NoPE one; attention over each layer's in-place cache."""
    g = Graph("attention")
    ids = g.add_input("ids", TensorType("int64", ("batch", "seq")))
    past = g.add_input("past_lengths", TensorType("int64", ("batch",)))
    positions = g.op("positions", [ids, past], name="positions")
    freqs = g.add_const("inv_freq", (10000.0 ** -(np.arange(0, D, 2) / D)).astype(np.float32))
    cos, sin = g.op("rope_angles", [positions, freqs], name="angles", n_out=2)
    scale = g.op("temperature_scale", [positions], name="temperature", attn_scale=0.1, floor_scale=4)
    outs = []
    for i in range(layers):
        flat = {n: g.add_input(f"{n}.{i}", TensorType("float32", ("batch", "seq", h * D)))
                for n, h in (("q", HQ), ("k", HKV), ("v", HKV))}
        q, k, v = (g.op("split_heads", [flat[n]], name=f"{n}_heads.{i}", num_heads=h, head_dim=D)
                   for n, h in (("q", HQ), ("k", HKV), ("v", HKV)))
        if rope:
            q = g.op("rope", [q, cos, sin], name=f"q_rope.{i}", impl="ort")
            k = g.op("rope", [k, cos, sin], name=f"k_rope.{i}", impl="ort")
            q = g.op("l2_norm", [q], name=f"q_norm.{i}", eps=1e-5)
        else:
            q = g.op("mul", [q, scale], name=f"q_scale.{i}")
        cache = [g.add_input(f"past_{n}.{i}", TensorType("float32", ("batch", HKV, C, D))) for n in ("key", "value")]
        outs += g.op("cache_attention", [q, k, v, *cache, past], name=f"attention.{i}",
                     outputs=[f"out.{i}", f"present_key.{i}", f"present_value.{i}"], scale=D ** -0.5, chunk_size=chunk)
    g.set_outputs(outs)
    return g


def structure(g: Graph) -> list[str]:
    """Each node as `op(inputs)`, an input named by its producer's op (or itself: a graph input or constant)."""
    def name(v: str) -> str:
        producer = g.values[v].producer
        return g.nodes[producer].op if producer else v
    return [f"{n.op}({', '.join(map(name, n.inputs))})" for n in g.topo_nodes()]


def feeds(g: Graph, batch: int, seq: int, past: list[int]) -> dict[str, np.ndarray]:
    """Random q, k, v and caches; each cache row holds values up to its cached length only (GroupQueryAttention
    does not copy the unused slots of a present buffer it does not share with the past one)."""
    rng = np.random.default_rng(seq)
    out = {"ids": np.zeros((batch, seq), np.int64), "past_lengths": np.array(past, np.int64)}
    for name in g.inputs:
        if name not in out:
            shape = [{"batch": batch, "seq": seq}.get(d, d) for d in g.type_of(name).shape]
            out[name] = rng.standard_normal(shape).astype(np.float32)
            if name.startswith("past_"):
                for row, cached in enumerate(past):
                    out[name][row, :, cached % C:] = 0
    return out


def test_rope_layer_before_expected():
    g = layer(rope=True)
    [(_, result)] = PassManager([FlatHeads()]).run(g)
    assert result.stats == {"rope": 2, "scale": 0, "attention": 1, "reshapes_cancelled": 4}
    body = [s for s in structure(g) if s.split("(")[0] not in ("positions", "rope_angles", "temperature_scale")]
    assert sorted(body) == sorted([
        "rope(q.0, rope_angles, rope_angles)", "split_heads(rope)", "l2_norm(split_heads)", "merge_heads(l2_norm)",
        "rope(k.0, rope_angles, rope_angles)",
        "cache_attention(merge_heads, rope, v.0, past_key.0, past_value.0, past_lengths)"])


def test_nope_layer_before_expected():
    g = layer(rope=False)
    [(_, result)] = PassManager([FlatHeads()]).run(g)
    assert result.stats == {"rope": 0, "scale": 1, "attention": 1, "reshapes_cancelled": 6}
    body = [s for s in structure(g) if s.split("(")[0] not in ("positions", "rope_angles", "temperature_scale")]
    assert sorted(body) == sorted(["merge_heads(temperature_scale)", "mul(q.0, merge_heads)",
                                   "cache_attention(mul, k.0, v.0, past_key.0, past_value.0, past_lengths)"])


def test_attention_lengths_before_expected():
    g = layer(rope=False, layers=2, chunk=4)
    [(_, result)] = PassManager([AttentionLengths()]).run(g)
    assert result.stats == {"layers": 2, "lengths_nodes": 1}
    lengths = "cache_lengths, cache_lengths, cache_lengths"
    assert sorted(s for s in structure(g) if s.startswith("cache_")) == [
        f"cache_attention(mul, split_heads, split_heads, past_key.0, past_value.0, past_lengths, {lengths})",
        f"cache_attention(mul, split_heads, split_heads, past_key.1, past_value.1, past_lengths, {lengths})",
        "cache_lengths(past_lengths, mul, past_key.0)"]
    assert AttentionLengths().run(g).stats == {"layers": 0, "lengths_nodes": 0}   # already shared


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("batch, seq, past", [(2, 1, [3, 5]), (2, 1, [6, 7]), (1, 3, [4])])   # [6, 7]: by matmuls
def test_outputs_unchanged_and_fewer_onnx_nodes(rope, batch, seq, past):
    g = layer(rope, layers=2, chunk=8)
    inputs = feeds(g, batch, seq, past)
    want = run_torch(g, inputs)
    before = [n.op_type for n in emit_onnx(g, None, None).model.graph.node]
    PassManager([FlatHeads(), AttentionLengths()]).run(g)
    for got in (run_torch(g, inputs), run_onnx(g, inputs)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    after = [n.op_type for n in emit_onnx(g, None, None).model.graph.node]
    # per layer, RoPE: q and k 4 Reshapes each and v 2 before, q's 2 around the qk norm after; NoPE: 6 before,
    # the scale's 1 after (one for the model once cse merges the layers')
    assert before.count("Reshape") - after.count("Reshape") == 2 * (8 if rope else 5)
    assert (before.count("ReduceMax"), after.count("ReduceMax")) == (4, 2)   # the lengths, once for both layers
    assert len(after) < len(before)


def test_standard_rope_and_per_head_scales_are_left_alone():
    g = layer(rope=True)
    for node in g.nodes.values():
        if node.op == "rope":
            node.attrs.pop("impl")
    g2 = layer(rope=False)
    per_head = g2.add_input("per_head", TensorType("float32", (1, 1, HQ, 1)))
    mul = next(n for n in g2.nodes.values() if n.op == "mul")
    g2.set_inputs(mul.name, [mul.inputs[0], per_head])
    for graph, kept in ((g, "rope(split_heads"), (g2, "mul(split_heads")):
        FlatHeads().run(graph)
        assert any(s.startswith(kept) for s in structure(graph)), print_ir(graph)
