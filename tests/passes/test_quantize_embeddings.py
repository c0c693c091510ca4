"""Quantized embedding tables and lm_heads (on by default for --quantize int8 / int4, as llama.cpp's Q8_0 and
Q4_0 files), the int8 runtime path with the in-place KV cache, and the int4 file size against Q4_0's.

Measured on tiny-scout (random weights, seed 0), builds against the fp32 build, 2 x 12 tokens: int8 (table and
lm_head quantized, accuracy_level 4) logits cosine 0.9936 mean, top-1 agreement 91.7%; int4 (rtn) 0.939 / 66.7%
(tiny random models are chaotic: bench/quantization.py has bench-16e's numbers). Against the torch form of
the same quantized graph (accuracy_level 0 there, int8 activations per block in onnxruntime): cosine > 0.999.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from l4compile.build import BuildOptions, build, compile_graph
from l4compile.emit.torch_module import GraphModule
from l4compile.lower import lower
from l4compile.passes import PassManager
from l4compile.passes.quantize import QuantizeINT4, QuantizeINT8, quantization_passes
from l4compile.quant.calibrate import reference_inputs
from l4compile.quant.report import logits_agreement, q4_0_bytes
from l4compile.runtime import Engine
from l4compile.weights import RandomWeights
from tests.conftest import load, token_ids


def tied(name: str = "tiny-scout"):
    return dataclasses.replace(load(name), tie_word_embeddings=True)


@pytest.mark.parametrize("pass_", [QuantizeINT4, QuantizeINT8])
def test_tied_table_is_quantized_once_for_both_uses(pass_):
    graph = lower(tied(), kv_cache=False)
    [(_, result)] = PassManager([pass_(embeddings=True)]).run(graph)
    bits = pass_.bits
    assert result.stats[f"embeddings_int{bits}"] == 1 and "embed_tokens" not in graph.values
    codes = [v for v in graph.params() if v.name.startswith("embed_tokens.")]
    assert [v.name for v in codes] == [f"embed_tokens.int{bits}", f"embed_tokens.int{bits}_scale"]
    assert codes[0].type.shape == (256, 2, 32 * bits // 8)
    readers = sorted(n.op for n in graph.users(codes[0].name))
    assert readers == ["embedding_nbits", "matmul_nbits"]


def test_tied_table_stays_float_for_both_uses_when_the_lm_head_is_kept():
    graph = lower(tied(), kv_cache=False)
    PassManager([QuantizeINT4(embeddings=True, lm_head=False)]).run(graph)
    assert graph.values["embed_tokens"].type.dtype == "float32"
    assert sorted(n.op for n in graph.users("embed_tokens")) == ["embedding", "linear"]


@pytest.mark.parametrize("pass_", [QuantizeINT4, QuantizeINT8])
def test_quantized_table_numerically(pass_):
    """The ONNX form (GatherBlockQuantized; MatMulNBits at accuracy_level 0) equals the torch form, tied or not."""
    from tests.passes.test_quantize import run_graph, run_onnx_with_weights
    feeds = {"input_ids": token_ids(2, 12)}
    for spec in (load("tiny-scout"), tied()):
        graph = lower(spec, kv_cache=False)
        PassManager([pass_(embeddings=True, accuracy_level=0)]).run(graph)
        np.testing.assert_allclose(run_onnx_with_weights(graph, feeds)[0], run_graph(graph, feeds)[0],
                                   atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized-tables")
    spec = load("tiny-scout")
    for label, options in {"fp32": {}, "int8": {"quantize": "int8"},
                           "int4": {"quantize": "int4", "int4_method": "rtn"},
                           "int4-float-tables": {"quantize": "int4", "int4_method": "rtn", "quantize_embeddings": False,
                                                 "quantize_lm_head": False}}.items():
        build(spec, root / label, RandomWeights(0), BuildOptions(**options), log=lambda _: None)
    build(tied(), root / "int4-tied", RandomWeights(0), BuildOptions(quantize="int4", int4_method="rtn"),
          log=lambda _: None)
    return root


def data_bytes(build_dir) -> int:
    return (build_dir / "model.onnx.data").stat().st_size


def test_int4_file_size_within_1_15x_of_q4_0(builds):
    """The issue's target. Our scales are the build dtype's (float32 here: 5 bits a weight, Q4_0's float16
    4.5; the embedding table's 8-bit blocks of 64: 8.5 bits); with the embedding table and lm_head in float the
    file is over twice Q4_0's."""
    ratio = data_bytes(builds / "int4") / q4_0_bytes(load("tiny-scout"))
    assert ratio <= 1.15
    assert data_bytes(builds / "int4-float-tables") > 1.5 * data_bytes(builds / "int4")
    assert data_bytes(builds / "int4-tied") < data_bytes(builds / "int4") - 256 * 64 * 5 // 8 + 1024
    assert data_bytes(builds / "int8") < 0.3 * data_bytes(builds / "fp32")


def test_manifest_and_inspect_say_what_was_quantized(builds):
    assert Engine.load(builds / "int4").manifest.quantization == {
        "weights": "int4", "activations": None, "embeddings": "int4", "method": "rtn", "block_size": 64, "lm_head_bits": 4,
        "lm_head_block_size": 64, "embedding_bits": 8, "embedding_block_size": 64}
    kept = Engine.load(builds / "int4-float-tables").manifest.quantization
    assert kept["embeddings"] is None and kept["lm_head"] == "kept"
    from l4compile.inspect import build_report
    from l4compile.quant.report import compare_builds, format_comparison
    text = format_comparison(compare_builds(builds / "int4-float-tables", builds / "fp32", batches=1, seq_len=8))
    assert "(int4 weights by rtn in blocks of 64, lm_head kept in high precision)" in text
    text = format_comparison(compare_builds(builds / "int4", builds / "fp32", batches=1, seq_len=8))
    assert "(int4 weights by rtn in blocks of 64, embeddings 8-bit blocks of 64, lm_head 4-bit blocks of 64)" in text
    sizes = build_report(load("bench-16e"))["quantized_build_bytes"]
    assert sizes["int4"] < sizes["int8"] < sizes["fp8"]   # int8 and int4 quantize the table, fp8 keeps it
    import onnx
    ops = {n.op_type for n in onnx.load(builds / "int8" / "model.onnx", load_external_data=False).graph.node}
    assert {"GatherBlockQuantized", "MatMulNBits", "QMoE"} <= ops


@pytest.mark.parametrize("label", ["int8", "int4", "int4-tied"])
def test_quantized_tables_match_the_torch_form_of_the_same_weights(label, builds):
    spec = tied() if label.endswith("tied") else load("tiny-scout")
    options = BuildOptions(quantize=label[:4], int4_method="rtn")
    engine = Engine.load(builds / label)
    ids = token_ids(2, 12)
    graph, _ = compile_graph(spec, options, log=lambda _: None, weights=RandomWeights(0))
    assert {"embedding_nbits", "matmul_nbits"} <= {n.op for n in graph.nodes.values()}
    with torch.no_grad():
        want = GraphModule(graph, RandomWeights(0)).eval()(*reference_inputs(graph, ids))[0].numpy()
    agreement = logits_agreement(engine.logits(ids), want)
    assert agreement["cosine_mean"] > (0.999 if label == "int8" else 0.995)   # onnxruntime: int8 activations


def test_int8_in_place_cache_decode_equals_the_full_forward_and_greedy_tokens(builds):
    """The int8 build decodes through the in-place KV cache: a 21-token prefill then 12 one-token steps
    (chunk 8: boundaries crossed) give the logits of the whole sequence at once; Engine.generate's greedy
    tokens are the argmax of the build's own full forward, token by token."""
    engine = Engine.load(builds / "int8")
    assert engine.manifest.kv_cache["in_place"]
    ids = token_ids(1, 33, seed=5)
    cache = engine.new_cache(batch=1, max_length=33)
    got = [engine.step(ids[:, :21], cache, logits_start=0)]
    got += [engine.step(ids[:, p:p + 1], cache, logits_start=0) for p in range(21, 33)]
    np.testing.assert_allclose(np.concatenate(got, axis=1), engine.logits(ids), atol=1e-3, rtol=0)
    prompt = ids[:, :10]
    out = engine.generate(prompt, 6, stop_tokens=())
    seq = prompt
    for _ in range(6):
        seq = np.concatenate([seq, engine.logits(seq)[:, -1:].argmax(-1)], axis=1)
    np.testing.assert_array_equal(out, seq)
