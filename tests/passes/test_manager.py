"""The pass manager: requires / ensures, verification, timing; pipelines by name, from YAML, with disabled passes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from l4compile.errors import IRError, PassError
from l4compile.ir import Graph, TensorType, print_ir
from l4compile.lower import lower
from l4compile.passes import PASSES, PIPELINES, Pass, PassManager, PassResult, load_pipeline, make_pass, pipeline
from l4compile.passes.pipelines import describe, run_pipeline
from l4compile.passes.properties import Property, register_property
from tests.conftest import load


def small_graph() -> Graph:
    g = Graph("small")
    x = g.add_input("x", TensorType("float32", ("batch", 4)))
    g.set_outputs([g.op("add", [x, x], name="double")])
    return g


register_property(Property("test-has-mul", "a mul node exists",
                           lambda g: None if any(n.op == "mul" for n in g.nodes.values()) else "no mul"))


@dataclass
class NeedsMul(Pass):
    name = "needs-mul"
    requires = ("test-has-mul",)

    def run(self, graph):
        return PassResult(False)


@dataclass
class BreaksPromise(Pass):
    name = "breaks-promise"
    ensures = ("test-has-mul",)

    def run(self, graph):
        return PassResult(False)


@dataclass
class Corrupts(Pass):
    name = "corrupts"

    def run(self, graph):
        graph.nodes["double"].inputs[0] = "ghost"
        return PassResult(True)


def test_unmet_precondition_is_refused_with_a_clear_error_or_skipped():
    with pytest.raises(PassError, match=r"pass needs-mul refused: it requires test-has-mul \(a mul node exists\), "
                                        r"which does not hold: no mul"):
        PassManager([NeedsMul()]).run(small_graph())
    [(name, result)] = PassManager([NeedsMul()], on_unmet="skip").run(small_graph())
    assert name == "needs-mul" and not result.changed and result.skipped.startswith("requires test-has-mul")


def test_broken_promise_and_broken_graph_are_caught_after_the_pass():
    with pytest.raises(IRError, match="pass breaks-promise promised test-has-mul"):
        PassManager([BreaksPromise()]).run(small_graph())
    with pytest.raises(IRError, match="dangling value 'ghost'"):
        PassManager([Corrupts()], verify_each=True).run(small_graph())
    PassManager([Corrupts()], verify_each=False).run(small_graph())  # without verification it goes unnoticed


def test_results_are_timed_and_seen_by_the_hook():
    seen = []
    results = PassManager(pipeline("trt"), after_pass=lambda p, g, r: seen.append(p.name)).run(lower(load("tiny-scout")))
    assert [name for name, _ in results] == seen == ["constant-fold", "moe-dispatch", "chunked-attention", "cse", "dce"]
    assert all(r.seconds > 0 for _, r in results)
    stats = dict(results)
    assert stats["moe-dispatch"].stats == {"blocks": 4} and stats["chunked-attention"].stats == {"layers": 3,
                                                                                                 "refused": 0}


def test_named_pipelines_and_defaults():
    assert {"none", "onnx-cpu", "trt"} <= set(PIPELINES)
    assert pipeline("none") == []
    trt_moe = [p for p in pipeline("trt") if p.name == "moe-dispatch"][0]
    cpu_moe = [p for p in pipeline("onnx-cpu") if p.name == "moe-dispatch"][0]
    assert trt_moe.impl == "grouped" and cpu_moe.impl == "ort"
    assert [p.name for p in pipeline("onnx-cpu", disable=["moe-dispatch", "cse"])] == \
        ["constant-fold", "chunked-attention", "global-attention-blocks", "rotary-embedding", "flat-heads",
         "attention-lengths", "dce"]
    text = describe()
    for name in list(PASSES) + list(PIPELINES):
        assert f"  {name} " in text
    assert "requires: moe-unfused; ensures: moe-dispatched" in text


@pytest.mark.parametrize("call, message", [
    (lambda: pipeline("onnx-cup"), r"unknown pipeline 'onnx-cup' \(did you mean 'onnx-cpu'\?\)"),
    (lambda: pipeline("trt", disable=["moe-dispach"]), r"unknown pass to disable 'moe-dispach' \(did you mean "
                                                         r"'moe-dispatch'\?\)"),
    (lambda: make_pass("moe-dispatch", {"imp": "gather"}), r"pass moe-dispatch has no option 'imp' \(did you mean "
                                                           r"'impl'\?\); options: impl, gather_max_tokens, "
                                                           r"ort_parts"),
    (lambda: make_pass("moe-dispatch", {"impl": "magic"}), r"impl 'magic' is not one of gather, grouped, auto, ort"),
    (lambda: make_pass("constant-fold", {"max_bytes": "big"}), r"option max_bytes must be int, got 'big'"),
    (lambda: load_pipeline("missing.yaml"), r"pipeline file missing.yaml does not exist"),
])
def test_pipeline_errors_name_the_problem(call, message):
    with pytest.raises(PassError, match=message):
        call()


def test_pipeline_file(tmp_path):
    path = tmp_path / "my-pipeline.yaml"
    path.write_text("passes:\n  - moe-dispatch: {impl: gather}\n  - chunked-attention\n  - dce\n")
    declared = load_pipeline(str(path))
    assert declared.name == "my-pipeline"
    assert [str(p) for p in declared.instantiate()] == \
        ["moe-dispatch(impl='gather', gather_max_tokens=8, ort_parts=1)", "chunked-attention", "dce"]


@pytest.mark.parametrize("text, message", [
    ("passes:\n  - dce\n  - chunked-atention\n", r"my\.yaml:3: passes\[1\]: unknown pass 'chunked-atention' "
                                                  r"\(did you mean 'chunked-attention'\?\)"),
    ("passes:\n  - moe-dispatch: {impl: 3}\n", r"my\.yaml:2: passes\[0\]: pass moe-dispatch: option impl must be str"),
    ("passes:\n  - [dce]\n", r"my\.yaml:2: passes\[0\]: expected a pass name"),
    ("pases: [dce]\n", r"expected a mapping with a 'passes' list"),
    ("passes: [dce]\nextra: 1\n", r"unknown key 'extra'"),
    ("passes: [dce\n", r"my\.yaml:2: invalid YAML"),
])
def test_bad_pipeline_files(tmp_path, text, message):
    (tmp_path / "my.yaml").write_text(text)
    with pytest.raises(PassError, match=message):
        load_pipeline(str(tmp_path / "my.yaml"))


def test_run_pipeline_logs_passes_and_prints_ir_after_one():
    lines = []
    label, _ = run_pipeline(lower(load("tiny-maverick")), "trt", disable=["cse"], verbose=True,
                            print_ir_after="chunked-attention", log=lines.append)
    assert label == "trt (without cse)"
    assert lines[0].startswith("pipeline trt: constant-fold(max_bytes=1048576), moe-dispatch(impl='grouped'")
    assert any(line.split()[:1] == ["moe-dispatch"] and "changed  blocks=2" in line for line in lines)
    printed = [line for line in lines if line.startswith("// IR after chunked-attention")]
    assert len(printed) == 1 and "chunked_attention(" in printed[0] and "moe_dispatch(" in printed[0]
    with pytest.raises(PassError, match="--print-ir-after moe-dispatch: that pass does not run in pipeline none"):
        run_pipeline(lower(load("tiny-maverick")), "none", print_ir_after="moe-dispatch")


def test_pipeline_none_is_the_straight_lowering():
    graph = lower(load("tiny-scout"))
    before = print_ir(graph)
    run_pipeline(graph, "none")
    assert print_ir(graph) == before
