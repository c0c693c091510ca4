"""Every op: its ONNX lowering (run by onnxruntime) equals its torch implementation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import torch

from l4compile.emit.onnx_emitter import emit_onnx
from l4compile.ir import Graph, TensorType, all_ops, verify

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def codes(*shape, dtype=np.int8):
    return rng.integers(0, 127, shape).astype(dtype)


def positions(n, start=0):
    return np.arange(start, start + n, dtype=np.int64)[None]


def chunked_masks():
    """chunked_mask's outputs for queries 10..22 after cached keys 8..9, chunk 8: a head of 6 queries."""
    q, k = np.arange(10, 16), np.arange(8, 16)
    head = np.where(k[None, :] <= q[:, None], 0, -np.inf).astype(np.float32)[None, None]
    block = np.triu(np.full((8, 8), -np.inf, np.float32), 1)
    return [head, block, np.array([6, 0, 8], dtype=np.int64)]


def kv_buffer(batch=2, heads=2, capacity=16, dim=8, cached=(3, 1)):
    """An in-place cache buffer whose row b holds cached[b] positions (zeros after them)."""
    buffer = f32(batch, heads, capacity, dim)
    for b, n in enumerate(cached):
        buffer[b, :, n:] = 0
    return buffer


# op -> (inputs, attrs, number of outputs)
CASES = {
    "embedding": ([rng.integers(0, 10, (2, 5)), f32(10, 6)], {}, 1),
    "linear": ([f32(2, 5, 6), f32(6, 3)], {}, 1),
    "rms_norm": ([f32(2, 5, 6), f32(6)], {"eps": 1e-5}, 1),
    "l2_norm": ([f32(2, 5, 2, 8)], {"eps": 1e-5}, 1),
    "add": ([f32(2, 5, 6), f32(2, 5, 6)], {}, 1),
    "mul": ([f32(2, 5, 2, 8), f32(1, 5, 1, 1)], {}, 1),
    "silu_mul": ([f32(2, 5, 6), f32(2, 5, 6)], {}, 1),
    "concat": ([f32(2, 3), f32(4, 3), f32(1, 3)], {"axis": 0}, 1),
    "split_heads": ([f32(2, 5, 12)], {"num_heads": 3, "head_dim": 4}, 1),
    "merge_heads": ([f32(2, 5, 3, 4)], {}, 1),
    "skip_rms_norm": ([f32(2, 5, 6), f32(2, 5, 6), f32(6)], {"eps": 1e-5}, 2),
    "cast": ([f32(2, 3)], {"dtype": "float16"}, 1),
    "positions": ([rng.integers(0, 10, (2, 7))], {}, 1),
    # a decode step of rows at positions 3 and 9 (chunk 8: 3 and 1 cached positions in their chunk)
    "cache_attention": ([f32(2, 1, 4, 8), f32(2, 1, 2, 8), f32(2, 1, 2, 8), kv_buffer(), kv_buffer(),
                         np.array([3, 9], dtype=np.int64)], {"scale": 8 ** -0.5, "chunk_size": 8}, 3),
    # what its layers share (passes/attention_lengths.py): rows at 3 and 9 of chunk 8, capacity 16, 2 heads per KV head
    "cache_lengths": ([np.array([3, 9], dtype=np.int64), f32(2, 1, 4, 8), kv_buffer()], {"chunk_size": 8, "group": 2}, 3),
    # onnxruntime-genai's decoder (ops_genai): a decode step of 2 rows at position 9 after 9 cached positions
    # (separate past and present buffers: onnxruntime writes present slots up to each row's length only)
    "mask_positions": ([rng.integers(0, 10, (2, 3)), np.array([[1] * 7, [1] * 5 + [0] * 2], dtype=np.int64)], {}, 1),
    "gqa_lengths": ([np.array([[1] * 7, [1] * 5 + [0] * 2], dtype=np.int64)], {}, 2),
    "chunk_bias": ([np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int64), np.ones((2, 11), dtype=np.int64)],
                   {"chunk_size": 4, "dtype": "float32"}, 1),
    "genai_attention": ([f32(2, 1, 4, 8), f32(2, 1, 2, 8), f32(2, 1, 2, 8), f32(2, 2, 9, 8), f32(2, 2, 9, 8),
                         np.array([9, 9], dtype=np.int32), np.array(10, dtype=np.int32),
                         np.where(np.arange(10) // 4 == 2, 0, -3e38).astype(np.float32)[None, None, None].repeat(2, 0)],
                        {"scale": 8 ** -0.5}, 3),
    "last_tokens": ([f32(2, 5, 6), np.array([3, 4], dtype=np.int32), np.stack([np.arange(5)] * 2)], {}, 1),
    "rope_angles": ([positions(7, 3), np.float32([1.0, 0.1, 0.01])], {}, 2),
    "rope": ([f32(2, 7, 3, 6), f32(1, 7, 3), f32(1, 7, 3)], {}, 1),
    "temperature_scale": ([positions(30)], {"attn_scale": 0.1, "floor_scale": 4}, 1),
    "attention_mask": ([positions(20), positions(20)], {"chunk_size": 8}, 1),
    "attention": ([f32(2, 6, 4, 8), f32(2, 6, 2, 8), f32(2, 6, 2, 8),
                   np.triu(np.full((6, 6), -np.inf, np.float32), 1)[None, None]], {"scale": 8 ** -0.5}, 1),
    "router_scores": ([f32(2, 5, 4)], {"top_k": 1}, 1),
    "transpose": ([f32(2, 5, 3, 4)], {"perm": (1, 0, 2, 3)}, 1),
    "kv_concat": ([f32(3, 2, 2, 4), f32(2, 5, 2, 4)], {}, 1),
    "key_positions": ([np.array(7, dtype=np.int64), f32(3, 2, 2, 4), rng.integers(0, 10, (2, 5))], {}, 1),
    "slice_seq": ([f32(2, 5, 6), np.array(3, dtype=np.int64)], {}, 1),
    "moe_experts": ([f32(2, 5, 6), np.abs(f32(2, 5, 3)), f32(3, 6, 8), f32(3, 4, 6)], {}, 1),
    "dequantize": ([codes(2, 5, 6) - 60, np.abs(f32(2, 5, 2))], {"axis": 2, "block_size": 3}, 1),
    "quantize": ([f32(2, 5, 6) * 100, np.array(0.5, np.float32)], {}, 1),
    "matmul_nbits": ([f32(2, 5, 40), codes(3, 2, 16, dtype=np.uint8), 0.1 * f32(3, 2)], {"block_size": 32}, 1),
    "embedding_nbits": ([rng.integers(0, 7, (2, 5)), codes(7, 2, 16, dtype=np.uint8), 0.1 * f32(7, 2)],
                        {"block_size": 32}, 1),
    "moe_experts_nbits": ([f32(2, 5, 32), np.abs(f32(2, 5, 3)), codes(3, 32, 2, 8, dtype=np.uint8), 0.1 * f32(3, 32, 2),
                           codes(3, 32, 1, 8, dtype=np.uint8), 0.1 * f32(3, 32, 1)], {"block_size": 16}, 1),
    "moe_dispatch_nbits": ([f32(2, 5, 32), f32(2, 5, 4), codes(4, 32, 2, 8, dtype=np.uint8), 0.1 * f32(4, 32, 2),
                            codes(4, 32, 1, 8, dtype=np.uint8), 0.1 * f32(4, 32, 1)], {"block_size": 16, "top_k": 2}, 1),
    "moe_dispatch": ([f32(2, 5, 6), f32(2, 5, 3), f32(3, 6, 8), f32(3, 4, 6)], {"top_k": 2, "impl": "grouped"}, 1),
    "chunked_mask": ([positions(13, 10), positions(15, 8)], {"chunk_size": 8}, 3),
    "chunked_attention": ([f32(2, 13, 4, 8), f32(2, 15, 2, 8), f32(2, 15, 2, 8)] + chunked_masks(),
                          {"chunk_size": 8, "scale": 8 ** -0.5}, 1),
    "blocked_attention": ([f32(2, 9, 4, 8), f32(2, 12, 2, 8), f32(2, 12, 2, 8), positions(9, 3), positions(12)],
                          {"block": 4, "scale": 8 ** -0.5}, 1),
    "patch_unfold": ([f32(3, 3, 8, 8)], {"patch_size": 4}, 1),
    "layer_norm": ([f32(2, 5, 6), f32(6), f32(6)], {"eps": 1e-5}, 1),
    "gelu": ([f32(2, 5, 6)], {}, 1),
    "append_token": ([f32(3, 4, 6), f32(6)], {}, 1),
    "drop_last_token": ([f32(3, 5, 6)], {}, 1),
    "pixel_shuffle": ([f32(3, 16, 8)], {"ratio": 0.5}, 1),
    "flatten_tiles": ([f32(3, 4, 6)], {}, 1),
    "merge_image_features": ([f32(2, 5, 6), np.array([[1, 9, 9, 2, 9], [9, 3, 4, 9, 5]]), f32(4, 6)],
                             {"image_token": 9}, 1),
}


# Ops onnxruntime cannot run, each with where it is tested instead.
NOT_ON_ONNXRUNTIME = {"all_reduce": "lowers to TensorRT's DistCollective: tests/ir/test_expert_blocks.py; "
                                    "its sum over ranks: tests/shard"}


def test_every_registered_op_has_a_case():
    assert set(all_ops()) == set(CASES) | set(NOT_ON_ONNXRUNTIME)


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_lowering_matches_torch(name):
    inputs, attrs, n_out = CASES[name]
    g = Graph(f"op_{name}")
    names = [g.add_input(f"in{i}", TensorType(str(a.dtype), a.shape)) for i, a in enumerate(inputs)]
    outs = g.op(name, names, name="out", n_out=n_out, **attrs)
    g.set_outputs(outs if n_out > 1 else [outs])
    verify(g)
    model = emit_onnx(g, None, None).model
    session = ort.InferenceSession(model.SerializeToString())
    got = session.run(None, {n: a for n, a in zip(names, inputs)})
    from l4compile.ir.op import get_op
    want = get_op(name).torch(torch, [torch.from_numpy(np.asarray(a)) for a in inputs], attrs)
    for gv, wv, out in zip(got, want, g.outputs):
        assert gv.shape == tuple(wv.shape)
        if g.type_of(out).dtype == "float8e4m3fn":  # onnxruntime hands float8 back as its uint8 bits
            gv, wv = gv.view(ml_dtypes.float8_e4m3fn).astype(np.float32), wv.float()
        else:
            assert str(gv.dtype) == g.type_of(out).dtype
        np.testing.assert_allclose(gv, wv.numpy(), atol=2e-5, rtol=1e-5)


def test_silu_mul_of_one_input_reads_gate_and_up_as_its_halves():
    both = f32(2, 5, 12)
    g = Graph("halves")
    g.set_outputs([g.op("silu_mul", [g.add_input("both", TensorType("float32", both.shape))], name="act")])
    verify(g)
    got = ort.InferenceSession(emit_onnx(g, None, None).model.SerializeToString()).run(None, {"both": both})[0]
    from l4compile.ir.op import get_op
    (want,) = get_op("silu_mul").torch(torch, [torch.from_numpy(both[..., :6]), torch.from_numpy(both[..., 6:])], {})
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-5)


def test_positions_per_row():
    g = Graph("per_row")
    ids, offsets = g.add_input("ids", TensorType("int64", ("batch", "seq"))), g.add_input("o", TensorType("int64", ("batch",)))
    g.set_outputs([g.op("positions", [ids, offsets], name="pos")])
    session = ort.InferenceSession(emit_onnx(g, None, None).model.SerializeToString())
    got = session.run(None, {"ids": np.zeros((2, 3), np.int64), "o": np.array([5, 0], np.int64)})[0]
    np.testing.assert_array_equal(got, [[5, 6, 7], [0, 1, 2]])


def test_chunked_mask_with_offset_positions():
    from l4compile.ir.op import get_op
    q, k = torch.arange(10, 13)[None], torch.arange(0, 13)[None]
    (mask,) = get_op("attention_mask").torch(torch, [q, k], {"chunk_size": 8})
    visible = (mask[0, 0] == 0).nonzero().tolist()
    assert visible == [[r, c] for r in range(3) for c in range(8, 11 + r)]
