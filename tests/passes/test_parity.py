"""Whole models before and after the pipelines: the tiny specs and an HF-imported checkpoint, full forward
and KV-cache decoding, onnxruntime and the torch module; fp32 logits within 1e-4 (float16 builds: below)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from l4compile.emit.torch_module import GraphModule
from l4compile.lower import lower
from l4compile.passes.pipelines import run_pipeline
from l4compile.runtime import Engine
from l4compile.weights import RandomWeights
from tests.conftest import SEQ_LENS, TINY_SPECS, load, token_ids

ATOL = 1e-4
# The named pipelines, and one with small blocks so that the tiny specs' short sequences run the
# multi-block paths too: several query blocks in global layers, both branches of the auto MoE dispatch.
SMALL_BLOCKS = """name: small-blocks
passes:
  - moe-dispatch: {impl: auto, gather_max_tokens: 4}
  - chunked-attention
  - global-attention-blocks: {block: 4}
  - cse
  - dce
"""
FAST = ("onnx-cpu", "trt", "small-blocks")


@pytest.fixture(scope="module")
def engines(built, tmp_path_factory):
    small = tmp_path_factory.mktemp("pipelines") / "small-blocks.yaml"
    small.write_text(SMALL_BLOCKS)
    path = {"small-blocks": str(small)}
    return {(name, p): Engine.load(built(name, path.get(p, p))) for name in TINY_SPECS for p in ("none",) + FAST}


@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("pipeline", ("none", "trt"))
def test_named_pipelines_equal_the_torch_reference(name, pipeline, engines, torch_reference):
    """The other named pipelines' builds on onnxruntime against the torch module directly, as the default
    (onnx-cpu) build is in tests/e2e/test_parity.py (SEQ_LENS: below, at and several times the chunk, past
    temperature floor steps)."""
    for seq in SEQ_LENS:
        ids = token_ids(2, seq, seed=seq)
        with torch.no_grad():
            want = torch_reference(name)(torch.from_numpy(ids)).numpy()
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(engines[name, pipeline].logits(ids), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("pipeline", FAST)
def test_full_forward_equals_the_straight_lowering(name, pipeline, engines):
    for seq in (1, 8, 21):  # chunk 8: below, at and across chunks
        ids = token_ids(2, seq, seed=seq)
        want = engines[name, "none"].logits(ids)
        np.testing.assert_allclose(engines[name, pipeline].logits(ids), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("pipeline", FAST)
@pytest.mark.parametrize("prefill, step", [(5, 1), (3, 6), (11, 13)])
def test_kv_decoding_equals_the_straight_lowering(name, pipeline, prefill, step, engines):
    """Prefill, then `step` tokens at a time against the chunk-bounded cache: partial chunks in the cache,
    steps that cross chunk boundaries, single-token decode."""
    ids = token_ids(2, 30, seed=prefill + step)

    def steps(engine):
        cache = engine.new_cache(batch=2, max_length=30)
        out = [engine.step(ids[:, :prefill], cache, logits_start=0)]
        out += [engine.step(ids[:, s:s + step], cache, logits_start=0) for s in range(prefill, 30, step)]
        return np.concatenate(out, axis=1)
    np.testing.assert_allclose(steps(engines[name, pipeline]), steps(engines[name, "none"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_torch_module_after_the_passes(name):
    ids = torch.from_numpy(token_ids(2, 19, seed=1))
    graph = lower(load(name), kv_cache=False)
    with torch.no_grad():
        want = GraphModule(graph, RandomWeights(0))(ids)
        run_pipeline(graph, "onnx-cpu")
        got = GraphModule(graph, RandomWeights(0))(ids)
    assert {n.op for n in graph.nodes.values()} >= {"moe_dispatch", "chunked_attention", "chunked_mask",
                                                    "blocked_attention"}
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=ATOL, rtol=0)


def test_hf_imported_checkpoint_matches_transformers_with_every_pipeline(tmp_path):
    """A transformers checkpoint (top-2 routing, so onnx-cpu's ORT MoE falls back to grouped; and top-1)."""
    from l4compile.build import BuildOptions, build
    from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
    from tests.hf.conftest import causal_lm, hf_logits, ids_for, save
    for top_k in (1, 2):
        checkpoint = save(causal_lm(seed=3, num_experts_per_tok=top_k), tmp_path / f"hf{top_k}")
        config, file = load_hf_config(checkpoint)
        spec = spec_from_hf_config(config, "parity", str(file))
        ids = ids_for(spec.vocab_size, seq=21)
        want = hf_logits(causal_lm(seed=3, num_experts_per_tok=top_k), ids)
        for pipeline in ("onnx-cpu", "trt"):
            out = tmp_path / f"build-{top_k}-{pipeline}"
            build(spec, out, HFCheckpoint.for_spec(checkpoint, spec), BuildOptions(pipeline=pipeline),
                  log=lambda _: None)
            np.testing.assert_allclose(Engine.load(out).logits(ids), want, atol=ATOL, rtol=0)


# float16 keeps 11 significant bits: each rounding errs by up to U16 = 2^-11 relative. Between the
# embeddings and the logits of a tiny spec lie ~80 rounded steps (4 layers of norms, projections,
# attention, experts, residual adds); independent roundings add like a random walk, about
# sqrt(80) ~ 9 U16 of the logits' scale. We allow 16 U16 of the largest reference logit (measured:
# 2.7-3.8 U16). What a real bug does is far outside it: on these specs and prompts, dropping
# temperature tuning moves the float32 logits by 0.09-0.15 (51-83 U16 of the scale), dropping the
# chunk mask by 3.6-4.5 (the first is checked below).
U16 = 2.0 ** -11
FLOAT16_ULPS = 16
FLOAT16_IDS = token_ids(2, 21, seed=2)


def decode_steps(engine: Engine) -> np.ndarray:
    """A 5-token prefill, then one token at a time to 21: the logits of every position."""
    cache = engine.new_cache(batch=2, max_length=21)
    out = [engine.step(FLOAT16_IDS[:, :5], cache, logits_start=0)]
    out += [engine.step(FLOAT16_IDS[:, s:s + 1], cache, logits_start=0) for s in range(5, 21)]
    return np.concatenate(out, axis=1)


def float16_tolerance(reference: np.ndarray) -> float:
    return FLOAT16_ULPS * U16 * float(np.abs(reference).max())


@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("pipeline", ("none", "onnx-cpu", "trt"))
def test_float16_builds_equal_the_float32_reference(name, pipeline, built, tmp_path):
    """KV-cache decoding of a float16 build (onnxruntime's CPU kernels differ by type, e.g. no float16
    scatter-add: every pipeline runs in float16) against the float32 straight lowering, crossing chunk
    boundaries and temperature floor steps."""
    from l4compile.build import BuildOptions, build
    build(load(name), tmp_path / "fp16", RandomWeights(0), BuildOptions(pipeline=pipeline, dtype="float16"),
          log=lambda _: None)
    engine = Engine.load(tmp_path / "fp16")
    assert engine.manifest.dtype == "float16"
    want = decode_steps(Engine.load(built(name, "none")))
    np.testing.assert_allclose(decode_steps(engine), want, atol=float16_tolerance(want), rtol=0)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_the_float16_tolerance_would_catch_a_dropped_feature(name, built, tmp_path):
    """The same float32 model without temperature tuning lands more than twice the float16 tolerance
    away from the reference (measured 51-83 U16 against 16): a float16 build missing it would fail."""
    from l4compile.build import BuildOptions, build
    spec = load(name)
    untuned = dataclasses.replace(spec, attention=dataclasses.replace(spec.attention, temperature_tuning=None))
    build(untuned, tmp_path / "untuned", RandomWeights(0), BuildOptions(pipeline="none"), log=lambda _: None)
    want = decode_steps(Engine.load(built(name, "none")))
    assert np.abs(decode_steps(Engine.load(tmp_path / "untuned")) - want).max() > 2 * float16_tolerance(want)
