"""The pure half of engine building: optimization profiles from the spec and limits, flags, manifest updates."""

from __future__ import annotations

import dataclasses

import pytest

from l4compile.errors import BuildError
from l4compile.runtime.manifest import Manifest
from l4compile.trt.profiles import (DEFAULT_MAX_SEQ, ENGINE_FILE, EngineLimits, EngineOptions, builder_flags,
                                    profiles, resolve_limits, with_engine, with_engine_pending)


@pytest.fixture(scope="module")
def manifest(trt_built) -> Manifest:
    """tiny-maverick: layers 0-2 chunked (chunk 8), layer 3 global; 1 KV head of 16 (the sequence-major cache);
    no engine limits recorded yet."""
    return dataclasses.replace(Manifest.read(trt_built("tiny-maverick")), trt=None)


def test_prefill_and_decode_profiles(manifest):
    prefill, decode = profiles(manifest, EngineLimits("fp16", max_batch=4, max_seq=64))
    assert (prefill.name, decode.name) == ("prefill", "decode")
    # prefill: 1..64 tokens against an empty cache
    assert prefill.shapes["input_ids"] == ((1, 1), (4, 32), (4, 64))
    assert prefill.shapes["past_key.0"] == ((0, 1, 1, 16), (0, 4, 1, 16), (0, 4, 1, 16))
    assert prefill.shapes["past_value.3"] == ((0, 1, 1, 16), (0, 4, 1, 16), (0, 4, 1, 16))
    assert prefill.values == {"past_length": (0, 0, 0), "logits_start": (0, 31, 63)}
    # decode: one token; a chunked layer caches at most chunk-1 = 7 positions, the global one max_seq-1
    assert decode.shapes["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode.shapes["past_key.0"] == ((0, 1, 1, 16), (3, 4, 1, 16), (7, 4, 1, 16))
    assert decode.shapes["past_key.3"] == ((0, 1, 1, 16), (31, 4, 1, 16), (63, 4, 1, 16))
    assert decode.values == {"past_length": (1, 32, 63), "logits_start": (0, 0, 0)}
    assert "past_length" not in prefill.shapes  # scalars have no dimensions to range over


def test_a_max_seq_below_the_chunk_caps_the_chunked_cache(manifest):
    _, decode = profiles(manifest, EngineLimits("fp16", max_batch=1, max_seq=5))
    assert decode.shapes["past_key.0"][2][0] == 4 and decode.shapes["past_key.3"][2][0] == 4


def test_a_build_without_kv_cache_has_one_profile(manifest):
    no_kv = dataclasses.replace(manifest, kv_cache=None, inputs=manifest.inputs[:1])
    (only,) = profiles(no_kv, EngineLimits("fp16", 2, 16))
    assert only.shapes == {"input_ids": ((1, 1), (2, 8), (2, 16))} and only.values == {}


def test_an_unknown_symbolic_dimension_is_an_error(manifest):
    odd = dataclasses.replace(manifest, inputs=[dataclasses.replace(manifest.inputs[0], shape=["batch", "tokens"])])
    with pytest.raises(BuildError, match="input_ids has dimension 'tokens'"):
        profiles(odd, EngineLimits("fp16", 1, 8))


@pytest.mark.parametrize("precision, quantized, flags", [
    ("fp32", (), ()), ("fp16", (), ("FP16",)), ("bf16", (), ("BF16",)),
    ("fp8", ("FP8",), ("FP8", "FP16")), ("fp16", ("INT4",), ("FP16", "INT4")), ("bf16", ("FP8",), ("BF16", "FP8")),
])
def test_builder_flags(precision, quantized, flags):
    assert builder_flags(precision, quantized) == flags


def test_fp8_needs_explicit_fp8_qdq():
    with pytest.raises(BuildError, match="--precision fp8 needs explicit FP8 Q/DQ .* --quantize fp8"):
        builder_flags("fp8", ())
    with pytest.raises(BuildError, match="unknown precision 'int3'"):
        builder_flags("int3")


def test_limits_command_line_then_manifest_then_defaults(manifest):
    assert resolve_limits(manifest, EngineOptions()) == EngineLimits("fp16", 1, DEFAULT_MAX_SEQ)
    assert resolve_limits(manifest, EngineOptions(), ("FP8",)).precision == "fp8"
    recorded = dataclasses.replace(manifest, trt={"precision": "bf16", "max_batch": 8, "max_seq": 128})
    assert resolve_limits(recorded, EngineOptions()) == EngineLimits("bf16", 8, 128)
    assert resolve_limits(recorded, EngineOptions("fp32", 2, 64)) == EngineLimits("fp32", 2, 64)
    with pytest.raises(BuildError, match="--max-seq 5000 exceeds the model's maximum context 4096"):
        resolve_limits(manifest, EngineOptions(max_seq=5000))


def test_manifest_pending_then_built_round_trips(manifest, tmp_path):
    limits = EngineLimits("fp16", 2, 32)
    pending = with_engine_pending(manifest, limits, "tensorrt is not installed")
    assert pending.backend == "onnxruntime" and "engine" not in pending.files
    assert pending.trt["status"] == "pending" and pending.trt["reason"] == "tensorrt is not installed"
    built = with_engine(pending, limits, profiles(manifest, limits), "10.15.1")
    assert built.backend == "tensorrt" and built.files["engine"] == ENGINE_FILE and built.target == "trt"
    assert built.trt["status"] == "built" and built.trt["flags"] == ["FP16"] and len(built.trt["profiles"]) == 2
    built.write(tmp_path)
    assert Manifest.read(tmp_path) == built
