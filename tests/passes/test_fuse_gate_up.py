"""fuse-gate-up: a SwiGLU MLP's gate and up projections as one matmul over their joined weights (onnx-cpu's late
pass, after quantization). The same numbers as before, in torch and in onnxruntime, fp32 and int4."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from l4compile.build import BuildOptions, build
from l4compile.errors import IRError
from l4compile.ir import TensorType
from l4compile.ir.graph import Graph
from l4compile.lower import lower
from l4compile.passes import PassManager
from l4compile.passes.fuse_gate_up import FuseGateUp
from l4compile.passes.pipelines import PIPELINES, run_pipeline
from l4compile.passes.quantize import QuantizeINT4
from l4compile.runtime import Engine
from l4compile.weights import RandomWeights
from tests.conftest import load, spec_path, token_ids
from tests.passes.test_quantize import run_graph, run_onnx_with_weights


def mlp(shared_input: bool = True, extra_reader: bool = False) -> Graph:
    g = Graph("mlp")
    x = g.add_input("x", TensorType("float32", ("batch", "seq", 64)))
    other = x if shared_input else g.op("mul", [x, x], name="sq")
    gate = g.op("linear", [x, g.add_param("gate_proj", TensorType("float32", (64, 96)))], name="mlp.gate")
    up = g.op("linear", [other, g.add_param("up_proj", TensorType("float32", (64, 96)))], name="mlp.up")
    act = g.op("silu_mul", [gate, up], name="mlp.act")
    out = g.op("linear", [act, g.add_param("down_proj", TensorType("float32", (96, 64)))], name="mlp.down")
    g.set_outputs([out, gate] if extra_reader else [out])
    return g


def ops(g: Graph) -> list[str]:
    return sorted(n.op for n in g.nodes.values())


@pytest.mark.parametrize("quantize", [False, True])
def test_fused_mlp_computes_the_same_in_torch_and_onnxruntime(quantize):
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)}
    before, after = mlp(), mlp()
    passes = [QuantizeINT4(accuracy_level=0)] if quantize else []
    PassManager(passes).run(before)
    results = PassManager(passes + [FuseGateUp()]).run(after)
    assert results[-1][1].stats == {"mlps": 1, "refused": 0}
    kind = "matmul_nbits" if quantize else "linear"
    assert ops(after) == sorted(["concat"] * (2 if quantize else 1) + [kind, kind, "silu_mul"])
    expected = run_graph(before, feeds)[0]
    np.testing.assert_allclose(run_graph(after, feeds)[0], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run_onnx_with_weights(after, feeds)[0], expected, atol=1e-4, rtol=0)


def test_left_alone_when_the_inputs_differ_or_gate_has_another_reader():
    for g in (mlp(shared_input=False), mlp(extra_reader=True)):
        before = ops(g)
        [(_, result)] = PassManager([FuseGateUp()]).run(g)
        assert result.stats == {"mlps": 0, "refused": 1} and ops(g) == before


def test_onnx_cpu_runs_it_after_quantization_and_it_can_be_disabled():
    graph = lower(load("tiny-scout"), kv_cache=False)
    _, results = run_pipeline(graph, "onnx-cpu", extra=[QuantizeINT4()], log=lambda _: None)
    assert [name for name, _ in results][-2:] == ["quantize-int4", "fuse-gate-up"]
    mlps = results[-1][1].stats["mlps"]
    assert mlps == sum(1 for n in graph.nodes.values() if n.op == "silu_mul") > 0
    assert not any(n.op == "linear" for n in graph.nodes.values() if "gate" in n.name or "up" in n.name)
    graph = lower(load("tiny-scout"), kv_cache=False)
    label, results = run_pipeline(graph, "onnx-cpu", disable=["fuse-gate-up"], log=lambda _: None)
    assert "fuse-gate-up" not in [name for name, _ in results] and "without fuse-gate-up" in label
    assert PIPELINES["onnx-cpu"].late == (("fuse-gate-up", {}),)


def test_one_input_silu_mul_needs_an_even_width():
    g = Graph("odd")
    x = g.add_input("x", TensorType("float32", (1, 7)))
    with pytest.raises(IRError, match="gate and up halves"):
        g.op("silu_mul", [x], name="act")


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_build_decodes_the_same_tokens_with_and_without_it(tmp_path, quantize):
    """The whole build, fused (the default) and not: the same logits over a prefill and cached steps."""
    ids = token_ids(1, 12)
    logits = []
    for label, disable in (("fused", ()), ("plain", ("fuse-gate-up",))):
        out = tmp_path / label
        build(load("tiny-scout"), out, RandomWeights(0),
              BuildOptions(quantize=quantize, int4_method="rtn", disable_passes=disable))
        model = onnx.load(out / "model.onnx", load_external_data=False)
        assert any(n.op_type == "Concat" and "gate_up" in n.name for n in model.graph.node) == (not disable)
        engine = Engine.load(out)
        logits.append(engine.logits(ids))
        logits.append(engine.generate(ids[:, :6], 6))
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(logits[1], logits[3])


def test_a_pipeline_file_names_late_passes(tmp_path):
    from l4compile.errors import PassError
    from l4compile.passes.pipelines import load_pipeline
    path = tmp_path / "mine.yaml"
    path.write_text("passes:\n  - cse\nlate:\n  - fuse-gate-up\n")
    assert load_pipeline(str(path)).late == (("fuse-gate-up", {}),)
    graph = lower(load("tiny-scout"), kv_cache=False)
    _, results = run_pipeline(graph, str(path), extra=[QuantizeINT4()], log=lambda _: None)
    assert [name for name, _ in results] == ["cse", "quantize-int4", "fuse-gate-up"]
    path.write_text("passes:\n  - cse\nlate:\n  - cse\n  - fuse-gate-upp\n")
    with pytest.raises(PassError, match=r"mine\.yaml:5: late\[1\]: unknown pass 'fuse-gate-upp'"):
        load_pipeline(str(path))
    path.write_text("passes:\n  - cse\nlate: fuse-gate-up\n")
    with pytest.raises(PassError, match="'late' must be a list"):
        load_pipeline(str(path))


def test_quantization_refuses_weights_joined_before_it(tmp_path, capsys):
    """fuse-gate-up listed among a pipeline file's passes (before --quantize's) would leave the joined weights float:
    the quantization pass refuses the graph, naming the joins and where the pass belongs."""
    from l4compile.cli import main
    path = tmp_path / "early.yaml"
    path.write_text("passes:\n  - cse\n  - fuse-gate-up\n")
    args = ["build", str(spec_path("tiny-scout")), "--dry-run", "--pipeline", str(path)]
    assert main([*args, "-q"]) == 0
    capsys.readouterr()
    assert main([*args, "--quantize", "int4", "-q"]) == 2
    err = capsys.readouterr().err
    assert "quantize-int4 refused" in err and "gate_up_weight" in err and "list it under late:" in err
