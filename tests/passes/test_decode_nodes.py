"""The onnx-cpu decode graph of a tiny spec, as onnxruntime runs it (after its own optimizer), has fewer
nodes with flat-heads and attention-lengths than without them: structure, not time."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import yaml

from l4compile.passes.pipelines import PIPELINES
from tests.conftest import load

OVERHEAD_PASSES = ("flat-heads", "attention-lengths")


def optimized_ops(build: Path, tmp_path: Path) -> Counter:
    """Node counts by op type of the graph onnxruntime executes each step (its optimized model)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{build.name}.optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(build / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
def test_decode_graph_has_fewer_nodes(name, built, tmp_path):
    without = tmp_path / "without.yaml"
    passes = [{n: o} for n, o in PIPELINES["onnx-cpu"].passes if n not in OVERHEAD_PASSES]
    without.write_text(yaml.safe_dump({"kv_layout": "in-place", "passes": passes}))
    before, after = (optimized_ops(built(name, p), tmp_path) for p in (str(without), "onnx-cpu"))
    spec = load(name)
    layers = len(spec.layers)
    kinds = len({layer.attention for layer in spec.layers})
    rope_layers = sum(layer.rope for layer in spec.layers)
    assert before["Add"] - after["Add"] >= 2 * (layers - kinds)               # the per-layer length sums
    # lengths once per layer kind: the longest row's total and cached length (onnxruntime's own CSE already
    # shared the second between layers)
    assert after["ReduceMax"] == 2 * kinds and before["ReduceMax"] == layers + kinds
    assert before["Reshape"] - after["Reshape"] >= 6 * rope_layers           # q, k, v straight into attention
    assert sum(after.values()) <= sum(before.values()) - 8 * layers
