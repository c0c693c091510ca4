"""The quantized tables' own precision in int4 builds: the embedding table in 8-bit blocks of 64 by default
(`--embedding-bits`), the lm_head in the tier's 4-bit blocks unless `--lm-head-bits 8`; the experts, attention
and FFNs stay 4-bit either way.

Why these defaults (README, Quantization): on bench/vs_llamacpp.py's models the int4 embedding table is the
quantization error that moves the logits most (bench-16e-8k cosine vs fp32: 0.84 with a 4-bit table, 0.88
with an 8-bit one, 0.844 with an 8-bit lm_head), and only one of the two tables fits at 8 bits within 1.15x
of llama.cpp's Q4_0 file.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from l4compile.build import BuildOptions, build
from l4compile.errors import BuildError
from l4compile.ir import TensorType, print_ir
from l4compile.ir.graph import Graph
from l4compile.passes import PassManager
from l4compile.passes.quantize import QuantizeINT4, quantization_passes
from l4compile.quant.report import logits_agreement
from l4compile.runtime import Engine
from l4compile.weights import RandomWeights
from tests.conftest import load, token_ids
from tests.passes.test_quantize import run_graph, run_onnx_with_weights


def tables() -> Graph:
    g = Graph("tables")
    ids = g.add_input("ids", TensorType("int64", ("batch", "seq")))
    table = g.add_param("embed_tokens", TensorType("float32", (100, 64)), init="embedding")
    w = g.add_param("w", TensorType("float32", (64, 64)))
    head = g.add_param("lm_head", TensorType("float32", (64, 100)))
    x = g.op("embedding", [ids, table], name="embed")
    g.set_outputs([g.op("linear", [g.op("linear", [x, w], name="mlp"), head], name="logits")])
    return g


EXPECTED_INT4_TABLE_8BIT = """graph tables(%ids: int64[batch, seq]) -> (%logits.2: float32[batch, seq, 100]) {
  param %w.int4: uint8[64, 2, 16]
  param %w.int4_scale: float32[64, 2]
  param %lm_head.int4: uint8[100, 2, 16]
  param %lm_head.int4_scale: float32[100, 2]
  param %embed_tokens.int8: uint8[100, 1, 64]
  param %embed_tokens.int8_scale: float32[100, 1]
  %embed.3 = embedding_nbits(%ids, %embed_tokens.int8, %embed_tokens.int8_scale) {bits=8, block_size=64} : float32[batch, seq, 64]
  %mlp.1 = matmul_nbits(%embed.3, %w.int4, %w.int4_scale) {accuracy_level=4, block_size=32} : float32[batch, seq, 64]
  %logits.2 = matmul_nbits(%mlp.1, %lm_head.int4, %lm_head.int4_scale) {accuracy_level=4, block_size=32} : float32[batch, seq, 100]
}"""

EXPECTED_INT4_LM_HEAD_8BIT = """graph tables(%ids: int64[batch, seq]) -> (%logits.2: float32[batch, seq, 100]) {
  param %w.int4: uint8[64, 2, 16]
  param %w.int4_scale: float32[64, 2]
  param %lm_head.int8: uint8[100, 1, 64]
  param %lm_head.int8_scale: float32[100, 1]
  param %embed_tokens.int4: uint8[100, 2, 16]
  param %embed_tokens.int4_scale: float32[100, 2]
  %embed.3 = embedding_nbits(%ids, %embed_tokens.int4, %embed_tokens.int4_scale) {block_size=32} : float32[batch, seq, 64]
  %mlp.1 = matmul_nbits(%embed.3, %w.int4, %w.int4_scale) {accuracy_level=4, block_size=32} : float32[batch, seq, 64]
  %logits.2 = matmul_nbits(%mlp.1, %lm_head.int8, %lm_head.int8_scale) {accuracy_level=4, bits=8, block_size=64} : float32[batch, seq, 100]
}"""


def test_int4_with_an_8bit_table_before_expected():
    g = tables()
    PassManager([QuantizeINT4(embeddings=True, embedding_bits=8, embedding_block_size=64)]).run(g)
    assert print_ir(g) == EXPECTED_INT4_TABLE_8BIT


def test_int4_with_an_8bit_lm_head_before_expected():
    g = tables()
    PassManager([QuantizeINT4(embeddings=True, lm_head_bits=8, lm_head_block_size=64)]).run(g)
    assert print_ir(g) == EXPECTED_INT4_LM_HEAD_8BIT


@pytest.mark.parametrize("precision", [{"embedding_bits": 8, "embedding_block_size": 64},
                                       {"lm_head_bits": 8, "lm_head_block_size": 64}])
def test_mixed_bits_numerically(precision):
    """ONNX (GatherBlockQuantized, MatMulNBits 4- and 8-bit at accuracy_level 0) equals the torch form."""
    g = tables()
    PassManager([QuantizeINT4(embeddings=True, accuracy_level=0, **precision)]).run(g)
    feeds = {"ids": token_ids(2, 12, vocab=100)}
    np.testing.assert_allclose(run_onnx_with_weights(g, feeds)[0], run_graph(g, feeds)[0], atol=1e-4, rtol=0)


def test_a_tied_table_takes_the_lm_heads_bits():
    import dataclasses
    from l4compile.lower import lower
    graph = lower(dataclasses.replace(load("tiny-scout"), tie_word_embeddings=True), kv_cache=False)
    PassManager([QuantizeINT4(embeddings=True, embedding_bits=8, embedding_block_size=64)]).run(graph)
    assert graph.values["embed_tokens.int4"].type == TensorType("uint8", (256, 2, 16))
    graph = lower(dataclasses.replace(load("tiny-scout"), tie_word_embeddings=True), kv_cache=False)
    PassManager([QuantizeINT4(embeddings=True, lm_head_bits=8, lm_head_block_size=64)]).run(graph)
    assert graph.values["embed_tokens.int8"].type == TensorType("uint8", (256, 1, 64))
    assert sorted(n.op for n in graph.users("embed_tokens.int8")) == ["embedding_nbits", "matmul_nbits"]


def test_build_options_record_each_tables_bits():
    q = BuildOptions(quantize="int4").quantization()
    assert (q["embedding_bits"], q["embedding_block_size"], q["lm_head_bits"], q["lm_head_block_size"]) == (8, 64, 4, 64)
    q = BuildOptions(quantize="int4", lm_head_bits=8, embedding_bits=4).quantization()
    assert (q["embedding_bits"], q["embedding_block_size"], q["lm_head_bits"], q["lm_head_block_size"]) == (4, 32, 8, 64)
    q = BuildOptions(quantize="int8").quantization()
    assert (q["embedding_bits"], q["embedding_block_size"], q["lm_head_bits"], q["lm_head_block_size"]) == (8, 32, 8, 64)
    kept = BuildOptions(quantize="int4", quantize_embeddings=False, quantize_lm_head=False).quantization()
    assert not {"embedding_bits", "lm_head_bits"} & set(kept)
    assert not {"embedding_bits", "lm_head_bits"} & set(BuildOptions(quantize="fp8").quantization())
    with pytest.raises(BuildError, match="--lm-head-bits 4 needs --quantize int4"):
        BuildOptions(quantize="int8", lm_head_bits=4).quantization()
    [int4] = quantization_passes(BuildOptions(quantize="int4", lm_head_bits=8).quantization())
    assert (int4.lm_head_bits, int4.lm_head_block_size, int4.embedding_bits) == (8, 64, 8)


# ---- builds: what the ONNX file holds, and logits against the float model ---------------------------

@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4-tables")
    spec = load("tiny-scout")
    for label, options in {"fp32": {}, "int4": {}, "int4-lm8": {"lm_head_bits": 8},
                           "int4-lm-float": {"quantize_lm_head": False}}.items():
        options = {"quantize": "int4", "int4_method": "rtn", **options} if label != "fp32" else {}
        build(spec, root / label, RandomWeights(0), BuildOptions(**options), log=lambda _: None)
    return root


def onnx_nodes(build_dir, op_type: str) -> list[dict]:
    model = onnx.load(build_dir / "model.onnx", load_external_data=False)
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} | {"inputs": list(n.input)}
            for n in model.graph.node if n.op_type == op_type]


def lm_head_node(build_dir) -> dict:
    [node] = [n for n in onnx_nodes(build_dir, "MatMulNBits") if n["N"] == 256]     # vocab 256, hidden 64
    return node


def test_default_int4_build_holds_an_8bit_table_and_4bit_everything_else(builds):
    [gather] = onnx_nodes(builds / "int4", "GatherBlockQuantized")
    assert (gather["bits"], gather["block_size"]) == (8, 64)
    # the layers in blocks of 64 (`build`'s default) where their input features divide by 64, else 32 (tiny-scout's
    # experts have 32); the lm_head in 4-bit blocks of 64 (TABLE_BLOCK_SIZE)
    head = lm_head_node(builds / "int4")
    assert (head["bits"], head["block_size"]) == (4, 64)
    layers = [n for n in onnx_nodes(builds / "int4", "MatMulNBits") if n["N"] != 256]
    assert {(n["bits"], n["block_size"], n["K"] % 64 == 0) for n in layers} == {(4, 64, True), (4, 32, False)}
    assert {(n["expert_weight_bits"], n["block_size"]) for n in onnx_nodes(builds / "int4", "QMoE")} == {(4, 32)}
    manifest = Engine.load(builds / "int4").manifest.quantization
    assert (manifest["embedding_bits"], manifest["lm_head_bits"]) == (8, 4)


def test_lm_head_bits_8_builds_an_8bit_lm_head_and_leaves_the_rest(builds):
    head = lm_head_node(builds / "int4-lm8")
    assert (head["bits"], head["block_size"], head["K"]) == (8, 64, 64)
    others = [n for n in onnx_nodes(builds / "int4-lm8", "MatMulNBits") if n is not head and n["N"] != 256]
    assert others and {(n["bits"], n["block_size"]) for n in others} <= {(4, 32), (4, 64)}
    assert Engine.load(builds / "int4-lm8").manifest.quantization["lm_head_bits"] == 8
    data = (builds / "int4-lm8" / "model.onnx.data").stat().st_size
    assert data - (builds / "int4" / "model.onnx.data").stat().st_size == 256 * 64 * (8.5 - 4.5) / 8   # bytes


def test_lm_head_logits_8bit_close_to_a_float_lm_head_4bit_further(builds):
    """The three int4 builds differ only in the lm_head (same round-to-nearest codes elsewhere), so their logits'
    differences are the lm_head's own error, not the chaos of a random model: 8-bit (with int8 activations,
    accuracy_level 4) within cosine 0.9999 of the float lm_head, 4-bit several times further."""
    ids = token_ids(2, 12)
    float_head = Engine.load(builds / "int4-lm-float").logits(ids)
    eight, four = (Engine.load(builds / label).logits(ids) for label in ("int4-lm8", "int4"))
    assert logits_agreement(eight, float_head)["cosine_min"] > 0.9999
    error8, error4 = (np.abs(x - float_head).mean() for x in (eight, four))
    assert error4 > 4 * error8


def test_default_int4_logits_stay_close_to_the_float_model(builds):
    """Against the fp32 build of the same weights (tiny random models are chaotic, hence the loose bound)."""
    ids = token_ids(2, 12)
    reference = Engine.load(builds / "fp32").logits(ids)
    for label in ("int4", "int4-lm8"):
        assert logits_agreement(Engine.load(builds / label).logits(ids), reference)["cosine_mean"] > 0.93


def test_cli_lm_head_bits(tmp_path):
    from tests.conftest import spec_path
    from tests.e2e.test_build import cli
    r = cli("build", spec_path("tiny-scout"), "--dry-run", "--quantize", "int8", "--lm-head-bits", "4")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--lm-head-bits 4 needs --quantize int4" in r.stderr
    r = cli("build", "--help")
    assert "--lm-head-bits" in r.stdout and "--embedding-bits" in r.stdout
