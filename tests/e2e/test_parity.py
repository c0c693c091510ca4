"""ONNX (onnxruntime CPU) against the torch reference on the tiny specs: fp32 logits within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l4compile.lower import lower
from l4compile.runtime import Engine
from l4compile.weights import RandomWeights
from tests.conftest import SEQ_LENS, TINY_SPECS, load, token_ids

@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("seq", SEQ_LENS)
def test_onnx_matches_torch(name, seq, built_tiny, torch_reference):
    ids = token_ids(2, seq, seed=seq)
    got = Engine.load(built_tiny(name)).logits(ids)
    with torch.no_grad():
        want = torch_reference(name)(torch.from_numpy(ids)).numpy()
    assert got.shape == (2, seq, 256) and got.dtype == np.float32
    assert np.abs(want).max() > 0.1  # the comparison is between non-trivial logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_batch_rows_are_independent(name, built_tiny):
    engine = Engine.load(built_tiny(name))
    ids = token_ids(2, 20, seed=3)
    both = engine.logits(ids)
    np.testing.assert_allclose(both[1:], engine.logits(ids[1:]), atol=1e-5, rtol=0)


def test_seeds_give_different_deterministic_weights():
    spec = load("tiny-scout")
    graph = lower(spec)
    param = graph.values["layers.0.self_attn.q_proj"]
    a, b, c = RandomWeights(0).get(param), RandomWeights(0).get(param), RandomWeights(1).get(param)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
