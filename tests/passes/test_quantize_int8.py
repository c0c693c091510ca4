"""quantize-int8 (8-bit blocks for MatMulNBits / QMoE) and the int8 / int4 build defaults (quantized
embedding table and lm_head, each with a way to keep it in high precision).

Tolerances on the tiny specs (random weights, seed 0): int8 weight-only logits cosine vs fp32 >= 0.999
(measured 0.99989 scout, 0.99921 maverick); the ONNX form (accuracy_level 0) equals the torch form to 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l4compile.build import BuildOptions, build, compile_graph
from l4compile.emit.torch_module import GraphModule
from l4compile.errors import PassError
from l4compile.ir import TensorType, print_ir
from l4compile.lower import lower
from l4compile.passes import PassManager
from l4compile.passes.quantize import QuantizeINT4, QuantizeINT8, quantization_passes
from l4compile.quant.calibrate import reference_inputs
from l4compile.quant.report import logits_agreement
from l4compile.quant.schemes import int8_blocks
from l4compile.runtime import Engine
from l4compile.weights import RandomWeights
from tests.conftest import TINY_SPECS, load, token_ids
from tests.passes.test_quantize import run_graph, run_onnx_with_weights, small

EXPECTED_INT8 = """graph small(%x: float32[batch, 8]) -> (%y.1: float32[batch, 32], %r: float32[batch, 2]) {
  param %router: float32[8, 2]
  param %w.int8: uint8[32, 1, 16]
  param %w.int8_scale: float32[32, 1]
  %r = linear(%x, %router) : float32[batch, 2]
  %y.1 = matmul_nbits(%x, %w.int8, %w.int8_scale) {accuracy_level=4, bits=8, block_size=16} : float32[batch, 32]
}"""


def test_int8_before_expected():
    g = small()
    [(_, result)] = PassManager([QuantizeINT8(block_size=16)]).run(g)
    assert result.stats["linear->matmul_nbits"] == 1 and result.stats["weights_kept_float"] == 0
    assert print_ir(g) == EXPECTED_INT8
    assert g.values["w.int8"].derived.scheme == "int8_blocks"


def test_int8_small_graph_numerically():
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    before, after = small(), small()
    PassManager([QuantizeINT8(block_size=16, accuracy_level=0)]).run(after)
    want = run_graph(before, {"x": x})
    got_onnx, got_torch = run_onnx_with_weights(after, {"x": x}), run_graph(after, {"x": x})
    np.testing.assert_allclose(got_onnx[0], got_torch[0], atol=1e-5)
    np.testing.assert_array_equal(got_torch[1], want[1])
    assert logits_agreement(got_torch[0], want[0])["cosine_mean"] > 0.9995


def test_int8_blocks_layout_and_error():
    w = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)   # K=40: padded to 2 blocks of 32
    parts = int8_blocks(w, axis=0, block_size=32)
    assert parts["q"].shape == (6, 2, 32) and parts["q"].dtype == np.uint8 and parts["scale"].shape == (6, 2)
    assert parts["q"][:, 1, 8:].tolist() == [[128] * 24] * 6                    # the padding is code 128 (zero)
    from l4compile.ir.ops_quant import unpack_nbits
    back = unpack_nbits(torch, torch.from_numpy(parts["q"]), torch.from_numpy(parts["scale"]), 40, 32, 8).numpy().T
    assert np.abs(back - w).max() <= parts["scale"].max() / 2 + 1e-6                # round to nearest, no clipping


@pytest.mark.parametrize("name", TINY_SPECS)
def test_int8_parity_before_after(name):
    """Every linear and the MoE experts (QMoE with 8-bit experts in the ONNX form) quantized."""
    feeds = {"input_ids": token_ids(2, 24)}
    want = run_graph(lower(load(name), kv_cache=False), feeds)[0]
    graph = lower(load(name), kv_cache=False)
    [(_, result)] = PassManager([QuantizeINT8(accuracy_level=0)]).run(graph)
    assert result.stats["weights_kept_float"] == 0
    got_torch = run_graph(graph, feeds)[0]
    assert logits_agreement(got_torch, want)["cosine_mean"] >= 0.999
    np.testing.assert_allclose(run_onnx_with_weights(graph, feeds)[0], got_torch, atol=1e-4, rtol=0)


def test_int8_is_rtn_only_and_refused_for_trt():
    with pytest.raises(PassError, match=r"unknown int8 method 'gptq'; choose one of rtn"):
        PassManager([QuantizeINT8(method="gptq")]).run(small())
    with pytest.raises(PassError, match="int8 emits onnxruntime's MatMulNBits"):
        quantization_passes({"weights": "int8"}, target="trt")


def test_build_defaults_quantize_embeddings_and_lm_head_for_int8_and_int4():
    assert BuildOptions(quantize="int8").quantization() == {"weights": "int8", "activations": None,
                                                            "embeddings": "int8", "lm_head_bits": 8,
                                                            "block_size": 64, "lm_head_block_size": 64,
                                                            "embedding_bits": 8, "embedding_block_size": 32}
    assert BuildOptions(quantize="int4").quantization()["embeddings"] == "int4"
    assert BuildOptions(quantize="fp8", quantize_embeddings=True).quantization()["embeddings"] == "int8"   # rows
    assert BuildOptions(quantize="fp8").quantization()["embeddings"] is None
    kept = BuildOptions(quantize="int4", int4_method="rtn", quantize_embeddings=False,
                        quantize_lm_head=False).quantization()
    assert kept["embeddings"] is None and kept["lm_head"] == "kept"
    graph = lower(load("tiny-scout"), kv_cache=False)
    PassManager(quantization_passes(kept)).run(graph)
    assert graph.values["lm_head"].type == TensorType("float32", (64, 256)) and "embed_tokens" in graph.values
    graph = lower(load("tiny-scout"), kv_cache=False)
    PassManager(quantization_passes(BuildOptions(quantize="int8").quantization())).run(graph)
    assert "lm_head" not in graph.values and "embed_tokens" not in graph.values
    assert graph.values["embed_tokens.int8"].type == TensorType("uint8", (256, 2, 32))   # blocks of 32, as Q8_0
    assert isinstance(quantization_passes(kept)[0], QuantizeINT4)


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "int8"
    build(load("tiny-scout"), out, RandomWeights(0), BuildOptions(quantize="int8"), log=lambda _: None)
    return out


def test_int8_build_generates_and_matches_its_graph(int8_build):
    """The build (QMoE 8-bit, MatMulNBits bits=8 at accuracy_level 4, int8 embedding rows) against its
    graph's torch form (int8 activations per block: close, not equal)."""
    engine = Engine.load(int8_build)
    assert engine.manifest.quantization["weights"] == "int8"
    assert engine.manifest.pipeline.endswith("+ quantize-int8")
    ids = token_ids(2, 12)
    graph, _ = compile_graph(load("tiny-scout"), BuildOptions(quantize="int8"), log=lambda _: None,
                             weights=RandomWeights(0))
    with torch.no_grad():
        want = GraphModule(graph, RandomWeights(0)).eval()(*reference_inputs(graph, ids))[0].numpy()
    assert logits_agreement(engine.logits(ids), want)["cosine_mean"] > 0.999
    assert engine.generate(ids, 4).shape == (2, 16)
