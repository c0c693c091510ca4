"""Quantization passes: before / expected, parity on the tiny specs (within the tolerances below),
preconditions refused, high-precision parts kept, and weights quantized inside the weight stream.

Tolerances on the tiny specs (random weights, seed 0; measured values in comments):
fp8 weight-only logits cosine >= 0.99 (0.9955 scout, 0.9943 maverick), int4 >= 0.95 (0.967, 0.964).
The quantized graph's ONNX form and its torch form agree to 1e-4 (same dequantized weights).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from l4compile.build import BuildOptions, build, compile_graph
from l4compile.emit.onnx_emitter import emit_onnx
from l4compile.emit.torch_module import GraphModule
from l4compile.errors import PassError
from l4compile.ir import Graph, TensorType, print_ir
from l4compile.lower import lower
from l4compile.passes import PassManager
from l4compile.passes.quantize import QuantizeFP8, QuantizeINT4, QuantizeINT8
from l4compile.passes.quantize_activations import UNCALIBRATED, QuantizeActivationsFP8
from l4compile.quant.calibrate import Calibration, reference_inputs
from l4compile.quant.report import compare_builds, format_comparison, logits_agreement
from l4compile.quant.schemes import fp8_per_channel, int4_blocks
from l4compile.runtime import Engine
from l4compile.weights import RandomWeights
from tests.conftest import TINY_SPECS, load, token_ids

MIN_COSINE = {"fp8": 0.99, "int4": 0.95}


# ---- before / expected ----------------------------------------------------------------------

def small(dtype: str = "float32") -> Graph:
    g = Graph("small")
    x = g.add_input("x", TensorType(dtype, ("batch", 8)))
    w = g.add_param("w", TensorType(dtype, (8, 32)))
    router = g.add_param("router", TensorType(dtype, (8, 2)), init="router")
    g.set_outputs([g.op("linear", [x, w], name="y"), g.op("linear", [x, router], name="r")])
    return g


EXPECTED_FP8 = """graph small(%x: float32[batch, 8]) -> (%y: float32[batch, 32], %r: float32[batch, 2]) {
  param %router: float32[8, 2]
  param %w.fp8: float8e4m3fn[8, 32]
  param %w.fp8_scale: float32[32]
  %r = linear(%x, %router) : float32[batch, 2]
  %w.dequantize = dequantize(%w.fp8, %w.fp8_scale) {axis=1, block_size=0} : float32[8, 32]
  %y = linear(%x, %w.dequantize) : float32[batch, 32]
}"""

EXPECTED_INT4 = """graph small(%x: float32[batch, 8]) -> (%y.1: float32[batch, 32], %r: float32[batch, 2]) {
  param %router: float32[8, 2]
  param %w.int4: uint8[32, 1, 8]
  param %w.int4_scale: float32[32, 1]
  %r = linear(%x, %router) : float32[batch, 2]
  %y.1 = matmul_nbits(%x, %w.int4, %w.int4_scale) {accuracy_level=4, block_size=16} : float32[batch, 32]
}"""


def test_fp8_before_expected():
    g = small()
    [(_, result)] = PassManager([QuantizeFP8()]).run(g)
    assert result.changed and result.stats["weights_fp8"] == 1
    assert print_ir(g) == EXPECTED_FP8
    derived = g.values["w.fp8"].derived
    assert (derived.source.name, derived.scheme, derived.part) == ("w", "fp8", "q")


def test_int4_before_expected():
    g = small()
    [(_, result)] = PassManager([QuantizeINT4(block_size=16)]).run(g)
    assert result.stats["linear->matmul_nbits"] == 1 and result.stats["weights_kept_float"] == 0
    assert print_ir(g) == EXPECTED_INT4


EXPECTED_QDQ = """graph small(%x: float32[batch, 8]) -> (%y: float32[batch, 32], %r: float32[batch, 2]) {
  param %router: float32[8, 2]
  param %w.fp8: float8e4m3fn[8, 32]
  param %w.fp8_scale: float32[32]
  const %x.act_scale: float32[]
  %r = linear(%x, %router) : float32[batch, 2]
  %w.dequantize = dequantize(%w.fp8, %w.fp8_scale) {axis=1, block_size=0} : float32[8, 32]
  %x.quantize = quantize(%x, %x.act_scale) : float8e4m3fn[batch, 8]
  %x.dequantize = dequantize(%x.quantize, %x.act_scale) : float32[batch, 8]
  %y = linear(%x.dequantize, %w.dequantize) : float32[batch, 32]
}"""


def test_fp8_activations_before_expected():
    """Only ops reading fp8 weights get the Q/DQ'd input: the router still reads x itself."""
    g = small()
    PassManager([QuantizeFP8(), QuantizeActivationsFP8(lambda graph, values: {"x": 44.8})]).run(g)
    assert print_ir(g) == EXPECTED_QDQ
    assert g.values["x.act_scale"].data == np.float32(0.1)     # absmax / 448


@pytest.mark.parametrize("make_pass", [QuantizeFP8, lambda: QuantizeINT4(block_size=16, accuracy_level=0)])
def test_small_graph_numerically(make_pass):
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    before, after = small(), small()
    PassManager([make_pass()]).run(after)
    want = run_graph(before, {"x": x})
    got_onnx, got_torch = run_onnx_with_weights(after, {"x": x}), run_graph(after, {"x": x})
    np.testing.assert_allclose(got_onnx[0], got_torch[0], atol=1e-5)
    np.testing.assert_array_equal(got_torch[1], want[1])      # the router is untouched
    assert logits_agreement(got_torch[0], want[0])["cosine_mean"] > 0.98


# ---- quantizers ----------------------------------------------------------------------------

def test_fp8_codes_round_trip_within_e4m3_precision():
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    parts = fp8_per_channel(w, axis=0)
    assert parts["scale"].shape == (1, 16) and parts["q"].dtype.name == "float8_e4m3fn"
    assert np.abs(parts["q"].astype(np.float32)).max() == 448.0        # each channel uses the whole range
    back = parts["q"].astype(np.float32) * parts["scale"]
    assert np.all(np.abs(back - w) <= np.abs(w) / 16 + 1e-6)            # 3 mantissa bits: <= 2^-4 relative


def test_int4_blocks_layout_and_error():
    w = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)   # K=40: padded to 2 blocks of 32
    parts = int4_blocks(w, axis=0, block_size=32)
    assert parts["q"].shape == (6, 2, 16) and parts["scale"].shape == (6, 2)
    from l4compile.ir.ops_quant import unpack_int4
    back = unpack_int4(torch, torch.from_numpy(parts["q"]), torch.from_numpy(parts["scale"]), 40, 32).numpy().T
    step = np.abs(parts["scale"]).max()
    assert np.abs(back - w).max() <= step / 2 + 1e-6 or np.abs(back - w).max() <= step   # rounding, or clip to +7


# ---- parity on the tiny specs ----------------------------------------------------------------

def run_graph(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outs = GraphModule(graph, RandomWeights(0)).eval()(*[torch.from_numpy(feeds[n]) for n in graph.inputs])
    return [o.numpy() for o in (outs if isinstance(outs, tuple) else (outs,))]


def run_onnx_with_weights(graph: Graph, feeds: dict[str, np.ndarray], tmp_path=None) -> list[np.ndarray]:
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        artifact = emit_onnx(graph, Path(tmp), RandomWeights(0))
        onnx.save_model(artifact.model, Path(tmp) / "model.onnx")
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)


@pytest.fixture(scope="module")
def fp32_logits():
    cache = {}

    def get(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = run_graph(lower(load(name), kv_cache=False), {"input_ids": token_ids(2, 24)})[0]
        return cache[name]
    return get


@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("scheme, make_pass", [("fp8", QuantizeFP8), ("int4", lambda: QuantizeINT4(accuracy_level=0))])
def test_parity_before_after(name, scheme, make_pass, fp32_logits):
    graph = lower(load(name), kv_cache=False)
    PassManager([make_pass()]).run(graph)
    feeds = {"input_ids": token_ids(2, 24)}
    got_torch = run_graph(graph, feeds)[0]
    agreement = logits_agreement(got_torch, fp32_logits(name))
    assert agreement["cosine_mean"] >= MIN_COSINE[scheme], agreement
    np.testing.assert_allclose(run_onnx_with_weights(graph, feeds)[0], got_torch, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_int4_with_int8_activations_stays_close_to_its_reference(name):
    """accuracy_level 4 lets onnxruntime quantize MatMulNBits' input to int8: close to, not equal to, torch."""
    graph = lower(load(name), kv_cache=False)
    PassManager([QuantizeINT4(accuracy_level=4)]).run(graph)
    feeds = {"input_ids": token_ids(2, 24)}
    agreement = logits_agreement(run_onnx_with_weights(graph, feeds)[0], run_graph(graph, feeds)[0])
    assert agreement["cosine_mean"] > 0.995, agreement


@pytest.mark.parametrize("name", TINY_SPECS)
def test_fp8_activations_qdq_runs_on_onnxruntime_like_torch(name):
    graph = lower(load(name), kv_cache=False)
    calibration = Calibration(RandomWeights(0), batches=2, seq_len=16)
    [_, (_, result)] = PassManager([QuantizeFP8(), QuantizeActivationsFP8(calibration)]).run(graph)
    assert result.stats["qdq_pairs"] > 0 and result.stats["calibrated"] == 1
    scales = [graph.values[n.inputs[1]].data for n in graph.nodes.values() if n.op == "quantize"]
    assert all(0 < s < 1 for s in scales)          # absmax / 448 of O(1)-O(100) activations
    feeds = {"input_ids": token_ids(2, 24)}
    got = run_onnx_with_weights(graph, feeds)[0]
    assert logits_agreement(got, run_graph(graph, feeds)[0])["cosine_mean"] > 0.999
    assert logits_agreement(got, run_graph(lower(load(name), kv_cache=False), feeds)[0])["cosine_mean"] > 0.98


def test_router_norms_and_embeddings_stay_high_precision():
    graph = lower(load("tiny-scout"), kv_cache=False)
    PassManager([QuantizeFP8()]).run(graph)
    kept = {v.name: v.type.dtype for v in graph.params() if v.derived is None}
    assert kept["embed_tokens"] == "float32" and kept["norm"] == "float32"
    assert all(dtype == "float32" for name, dtype in kept.items() if name.endswith(("router", "layernorm")))
    assert "lm_head" not in kept and "layers.0.feed_forward.experts.gate_up_proj" not in kept
    embedded = lower(load("tiny-scout"), kv_cache=False)
    PassManager([QuantizeFP8(embeddings=True)]).run(embedded)
    assert embedded.values["embed_tokens.int8"].type == TensorType("int8", (256, 64))


# ---- preconditions ---------------------------------------------------------------------------

def test_quantizing_twice_is_refused():
    g = small()
    PassManager([QuantizeFP8()]).run(g)
    for again in (QuantizeFP8(), QuantizeINT4(), QuantizeINT8()):
        with pytest.raises(PassError, match=rf"pass {again.name} refused: it requires weights-unquantized .* "
                                            r"1 weight\(s\) are already quantized \(w\)"):
            PassManager([again]).run(g)


def test_int4_refuses_bfloat16_weights():
    with pytest.raises(PassError, match=r"quantize-int4 refused: it requires weights-cpu-float .* weights are bfloat16"):
        PassManager([QuantizeINT4()]).run(small("bfloat16"))


def test_activations_need_fp8_weights_and_a_calibration():
    with pytest.raises(PassError, match=r"requires weights-fp8 .* no op reads float8 weights"):
        PassManager([QuantizeActivationsFP8(UNCALIBRATED)]).run(small())
    g = small()
    with pytest.raises(PassError, match="needs activation ranges"):
        PassManager([QuantizeFP8(), QuantizeActivationsFP8()]).run(g)
    g = small()
    PassManager([QuantizeFP8(), QuantizeActivationsFP8(UNCALIBRATED)]).run(g)
    with pytest.raises(PassError, match=r"requires activations-unquantized .* 1 activation\(s\) already have Q/DQ"):
        PassManager([QuantizeActivationsFP8(UNCALIBRATED)]).run(g)


@pytest.mark.parametrize("options, message", [
    ({"quantize": "int4", "quantize_activations": True}, "int4 is weight-only"),
    ({"quantize": "int4", "target": "trt"}, "TensorRT does not parse"),
])
def test_build_refuses_combinations_the_target_cannot_run(options, message):
    with pytest.raises(PassError, match=message):
        compile_graph(load("tiny-scout"), BuildOptions(**options), log=lambda _: None)


# ---- builds: streaming, runtime, report ------------------------------------------------------

class RecordingWeights(RandomWeights):
    def __init__(self) -> None:
        super().__init__(0)
        self.reads: list[str] = []

    def get(self, param):
        self.reads.append(param.name)
        return super().get(param)


@pytest.mark.parametrize("scheme, method, reads", [("fp8", "rtn", 1), ("int4", "rtn", 1), ("int4", "gptq", 2)])
def test_each_source_tensor_is_read_once_and_written_quantized(scheme, method, reads, tmp_path):
    """Once by the weight stream (and, for GPTQ, once before it by the calibration that makes its Hessians)."""
    weights, spec = RecordingWeights(), load("tiny-maverick")
    report = build(spec, tmp_path / "m", weights, BuildOptions(quantize=scheme, int4_method=method),
                   log=lambda _: None)
    assert len(weights.reads) == reads * len(set(weights.reads)) == reads * len(lower(spec).params())
    assert report.files["model.onnx.data"] < 0.45 * sum(v.type.nbytes() for v in lower(spec).params())
    model = onnx.load(tmp_path / "m" / "model.onnx", load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if len(t.dims) >= 2)


@pytest.mark.parametrize("make_pass", [QuantizeFP8, QuantizeINT4])
def test_peak_memory_of_a_quantized_emit_stays_near_one_tensor(make_pass, tmp_path):
    """8 weights of 4 MB: quantizing them while they stream needs about one source tensor and its codes."""
    g = Graph("wide")
    x = g.add_input("x", TensorType("float32", ("batch", 512)))
    for i in range(8):
        x = g.op("linear", [x, g.add_param(f"w{i}", TensorType("float32", (512, 2048)))], name=f"up{i}")
        x = g.op("linear", [x, g.add_param(f"v{i}", TensorType("float32", (2048, 512)))], name=f"down{i}")
    g.set_outputs([x])
    PassManager([make_pass()]).run(g)
    tensor = 512 * 2048 * 4
    tracemalloc.start()
    emit_onnx(g, tmp_path, RandomWeights(0))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * tensor      # the model is 16 tensors


@pytest.fixture(scope="module")
def quantized_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    spec = load("tiny-scout")
    for label, options in {"fp32": {}, "fp8": {"quantize": "fp8"}, "int4": {"quantize": "int4"},
                           "fp8-qdq": {"quantize": "fp8", "quantize_activations": True}}.items():
        build(spec, root / label, RandomWeights(0), BuildOptions(**options), log=lambda _: None)
    return root


@pytest.mark.parametrize("label", ["fp8", "int4", "fp8-qdq"])
def test_quantized_builds_generate_and_match_their_graph(label, quantized_builds):
    engine = Engine.load(quantized_builds / label)
    scheme = label.split("-")[0]
    assert engine.manifest.quantization["weights"] == scheme
    assert engine.manifest.pipeline.endswith(f"+ quantize-{scheme}" + (" + quantize-fp8-activations" if "qdq" in label
                                                                     else ""))
    ids = token_ids(2, 12)
    options = BuildOptions(quantize=scheme, quantize_activations=label == "fp8-qdq")
    graph, _ = compile_graph(load("tiny-scout"), options, log=lambda _: None, weights=RandomWeights(0))
    with torch.no_grad():
        want = GraphModule(graph, RandomWeights(0)).eval()(*reference_inputs(graph, ids))[0].numpy()
    tolerance = 0.999 if label != "int4" else 0.995    # int4: onnxruntime's int8 activations (accuracy_level 4)
    assert logits_agreement(engine.logits(ids), want)["cosine_mean"] > tolerance
    assert engine.generate(ids, 4).shape == (2, 16)


def test_quant_report(quantized_builds):
    report = compare_builds(quantized_builds / "fp8", quantized_builds / "fp32", batches=2, seq_len=16)
    assert report["cosine_mean"] >= MIN_COSINE["fp8"] and 0 < report["top1_agreement"] <= 1
    assert report["weight_bytes"] < 0.4 * report["reference_weight_bytes"]
    text = format_comparison(report)
    for line in ("logits cosine", "top-1 agreement", "abs logit error   max", "weights file", "(fp8 weights)"):
        assert line in text


def test_quant_report_refuses_builds_of_different_specs(quantized_builds, built_tiny):
    from l4compile.errors import BuildError
    with pytest.raises(BuildError, match="builds of different specs"):
        compare_builds(quantized_builds / "fp8", built_tiny("tiny-maverick"))


# ---- command line ------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_build_quantized_then_quant_report(tmp_path):
    from tests.conftest import spec_path
    from tests.e2e.test_build import cli
    spec = spec_path("tiny-scout")
    assert cli("build", spec, "--weights", "random", "-o", tmp_path / "fp32").returncode == 0
    r = cli("build", spec, "--weights", "random", "-o", tmp_path / "int4", "--quantize", "int4", "-v")
    assert r.returncode == 0, r.stderr
    assert "quantize-int4" in r.stderr and "linear->matmul_nbits=" in r.stderr
    r = cli("quant-report", tmp_path / "int4", "--reference", tmp_path / "fp32", "--batches", "1")
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement" in r.stdout and "(int4 weights by gptq in blocks of 64, " in r.stdout and "x)" in r.stdout


def test_cli_refuses_int4_activations_in_one_line(tmp_path):
    from tests.conftest import spec_path
    from tests.e2e.test_build import cli
    r = cli("build", spec_path("tiny-scout"), "--dry-run", "--quantize", "int4", "--quantize-activations")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "int4 is weight-only" in r.stderr


def test_scout_int4_dry_run_is_the_size_inspect_predicts():
    """Scout at int4 fits one 80 GB GPU: the graph a build would write is the size `inspect` reports."""
    from l4compile.build import dry_run
    from l4compile.inspect import build_report
    spec = load("scout")
    report = dry_run(spec, BuildOptions(quantize="int4", dtype="float16"), log=lambda _: None)
    predicted = build_report(spec)["quantized_build_bytes"]["int4"]
    written = report.files["model.onnx.data"] + report.files.get("vision.onnx.data", 0)   # the vision model: float16
    assert written == pytest.approx(predicted, rel=0.002)
    assert report.files["model.onnx.data"] < 64e9
