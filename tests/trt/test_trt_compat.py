"""The static TensorRT compatibility check: our trt ONNX passes, anything the parser would reject fails loudly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from l4compile.errors import BuildError
from l4compile.trt.compat import REPORT_JSON, REPORT_TEXT, check_file, check_model, load_table
from tests.conftest import TINY_SPECS, load


def _emitted(spec, target: str = "trt", pipeline: str | None = None, dtype: str = "float32") -> onnx.ModelProto:
    from l4compile.build import DATA_FILE, BuildOptions, compile_graph
    from l4compile.emit.onnx_emitter import emit_onnx
    graph, _ = compile_graph(spec, BuildOptions(target=target, pipeline=pipeline, dtype=dtype), log=lambda _: None)
    return emit_onnx(graph, None, None, DATA_FILE, {}).model


@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_trt_pipeline_onnx_passes_the_check(name, dtype):
    report = check_model(_emitted(load(name), dtype=dtype))
    assert report.ok, "\n".join(p.line() for p in report.problems)
    assert not [n for n in report.op_counts if n.startswith("com.")]


@pytest.mark.parametrize("name", ["scout", "maverick", "behemoth"])
def test_full_size_dry_run_for_trt_passes_the_check(name):
    from l4compile.build import BuildOptions, dry_run
    dry_run(load(name), BuildOptions(target="trt", dtype="bfloat16"), log=lambda _: None)  # raises if not


def test_onnxruntime_flavour_is_rejected_with_one_line_naming_the_contrib_node():
    """The onnx-cpu pipeline uses onnxruntime's com.microsoft ops (attention over the in-place cache, rotary,
    MoE): exactly what the trt pipeline must not."""
    report = check_model(_emitted(load("tiny-maverick"), target="onnx"))
    assert not report.ok
    assert {"MoE", "GroupQueryAttention"} <= {p.op for p in report.problems}
    first = report.problems[0]
    assert "com.microsoft" in first.reason
    with pytest.raises(BuildError) as err:
        report.raise_if_incompatible()
    message = str(err.value)
    assert "\n" not in message and first.node in message and f"({first.op})" in message


def _model(nodes, inputs, outputs, initializers=(), opset=21, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def _io(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


F, D = TensorProto.FLOAT, TensorProto.DOUBLE
BAD_MODELS = {
    "contrib op": (lambda: _model(
        [helper.make_node("FastGelu", ["x"], ["y"], name="gelu", domain="com.microsoft")],
        [_io("x", F, [2])], [_io("y", F, [2])], domains=["com.microsoft"]), "gelu", "FastGelu", "com.microsoft"),
    "unsupported dtype": (lambda: _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
        [_io("a", D, [2, 2]), _io("b", D, [2, 2])], [_io("y", D, [2, 2])]), "mm", "MatMul", "is DOUBLE"),
    "unsupported op": (lambda: _model(
        [helper.make_node("Det", ["x"], ["y"], name="det")],
        [_io("x", F, [2, 2])], [_io("y", F, [])]), "det", "Det", "not supported by TensorRT"),
    "scatter with reduction": (lambda: _model(
        [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="scatter", reduction="add")],
        [_io("x", F, [4, 2]), _io("u", F, [1, 2])], [_io("y", F, [4, 2])],
        [numpy_helper.from_array(np.array([[1]], dtype=np.int64), "i")]), "scatter", "ScatterND", "reduction='add'"),
    "topk unsorted": (lambda: _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0)],
        [_io("x", F, [8])], [_io("v", F, [1]), _io("i", TensorProto.INT64, [1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "k")]), "topk", "TopK", "sorted=0"),
    "topk k too large": (lambda: _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
        [_io("x", F, [5000])], [_io("v", F, [4000]), _io("i", TensorProto.INT64, [4000])],
        [numpy_helper.from_array(np.array([4000], dtype=np.int64), "k")]), "topk", "TopK", "is 4000"),
    "reduce axes at run time": (lambda: _model(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")],
        [_io("x", F, [2, 3]), _io("axes", TensorProto.INT64, [1])], [_io("y", F, None)]),
        "mean", "ReduceMean", "computed at run time"),
    "quantize with zero point": (lambda: _model(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q")],
        [_io("x", F, [4])], [_io("y", TensorProto.INT8, [4])],
        [numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s"),
         numpy_helper.from_array(np.array(3, dtype=np.int8), "z")]), "q", "QuantizeLinear", "not all zero"),
    "opset too new": (lambda: _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [_io("x", F, [2])], [_io("y", F, [2])], opset=25), "<model>", "opset", "outside the parser's range"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_node_tensorrt_would_reject_fails_loudly(case):
    make, node, op, reason = BAD_MODELS[case]
    report = check_model(make())
    assert not report.ok
    with pytest.raises(BuildError, match="TensorRT would reject this model") as err:
        report.raise_if_incompatible()
    message = str(err.value)
    assert "\n" not in message and repr(node) in message and f"({op})" in message and reason in message


def test_control_flow_bodies_are_checked_too():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]),
         helper.make_node("Det", ["x"], ["d"], name="inner-det")],
        "body", [_io("i", TensorProto.INT64, []), _io("cond", TensorProto.BOOL, [])],
        [_io("cond_out", TensorProto.BOOL, []), _io("d", F, [])])
    loop = helper.make_node("Loop", ["n", ""], ["ds"], name="loop", body=body)
    model = _model([loop], [_io("n", TensorProto.INT64, []), _io("x", F, [2, 2])], [_io("ds", F, None)])
    assert [p.node for p in check_model(model).problems] == ["inner-det"]


def test_report_files(trt_built):
    directory = trt_built("tiny-maverick")
    data = json.loads((directory / REPORT_JSON).read_text())
    assert data["ok"] is True and data["problems"] == []
    assert data["table_source"]["file"] == "docs/operators.md" and "TensorRT 10.15" in data["table_source"]["version"]
    assert data["op_counts"]["MatMul"] > 0
    text = (directory / REPORT_TEXT).read_text()
    assert text.startswith("TensorRT compatibility: OK") and "onnx-tensorrt" in text
    assert check_file(directory / "model.onnx").ok


def test_table_is_data_with_its_source():
    table = load_table()
    assert table["source"]["repository"].endswith("onnx/onnx-tensorrt") and table["opset_max"] == 24
    kinds = {"attr_in", "absent_attrs", "absent_inputs", "absent_outputs", "output_types", "const_input",
             "const_input_below", "zero_input"}
    for op, entry in table["ops"].items():
        assert not entry["supported"] or entry["types"], op
        assert {c["check"] for c in entry.get("checks", [])} <= kinds, op
        assert all(c["why"] for c in entry.get("checks", [])), op
    for amendment in table["amendments"]:
        assert amendment["source"] and amendment["why"] and amendment["op"] in table["ops"]


def test_shape_tensors_and_data_dependent_shapes_are_reported(trt_built):
    """logits_start decides the logits' length: TensorRT must read it on the host (a shape tensor).
    past_length only shifts values (key positions are sized from shapes), so it stays a device input."""
    report = check_file(trt_built("tiny-scout") / "model.onnx")
    assert report.shape_tensor_inputs == ["logits_start"]
    straight = check_model(_emitted(load("tiny-scout"), pipeline="none"))
    assert straight.shape_tensor_inputs == ["logits_start"] and straight.data_dependent == []
    assert "shape-tensor inputs (host memory, a value range per profile): logits_start" in straight.to_text()


def test_a_shape_computed_from_values_is_data_dependent():
    def model(start_from):
        nodes = [helper.make_node("Shape", ["x"], ["shape"]),
                 helper.make_node("ArgMax", ["x"], ["argmax"], keepdims=1),
                 helper.make_node("Slice", ["x", start_from, "end"], ["y"], name="slice")]
        return _model(nodes, [_io("x", F, [8])], [_io("y", F, None)],
                      [numpy_helper.from_array(np.array([8], dtype=np.int64), "end")])
    assert check_model(model("argmax")).data_dependent == [{"node": "slice", "op": "Slice", "input": "argmax"}]
    assert check_model(model("shape")).data_dependent == []
