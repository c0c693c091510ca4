"""The trt pipeline's ONNX runs on onnxruntime with the onnx-cpu build's outputs (the parity that runs everywhere)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from l4compile.runtime import Engine
from tests.conftest import TINY_SPECS, token_ids


@pytest.mark.parametrize("name", TINY_SPECS)
def test_trt_build_matches_onnx_cpu_build_on_onnxruntime(name, built_tiny, trt_built):
    reference, trt = Engine.load(built_tiny(name)), Engine.load(trt_built(name))
    assert trt.manifest.pipeline.startswith("trt") and reference.manifest.pipeline.startswith("onnx-cpu")
    ids = token_ids(2, 20, seed=3)  # 2.5 chunks of 8: chunk boundaries inside the prompt
    np.testing.assert_allclose(trt.logits(ids), reference.logits(ids), atol=1e-4, rtol=0)
    prompt = token_ids(2, 5, seed=4)
    np.testing.assert_array_equal(trt.generate(prompt, 12, stop_tokens=()),
                                  reference.generate(prompt, 12, stop_tokens=()))


@pytest.mark.parametrize("name", TINY_SPECS)
def test_trt_onnx_is_standard_onnx_only(name, trt_built):
    model = onnx.load(str(trt_built(name) / "model.onnx"), load_external_data=False)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    onnx.checker.check_model(str(trt_built(name) / "model.onnx"), full_check=True)
