"""Parameter accounting, FLOPs, weight bytes and KV cache of `build_report`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from l4compile.inspect import (DTYPES, build_report, canonical_dtype, format_report,
                               parse_size, storage_bytes)
from l4compile.spec import ModelSpec, VisionSpec, load_spec
from l4compile.spec.params import BREAKDOWN_KEYS, active_matmul_params

from .conftest import FULL_SIZE, SHIPPED, spec_path

TINY_VISION = VisionSpec(image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=128, vision_output_dim=64, projector_input_dim=64,
                         projector_output_dim=64)


def report_of(name: str, **kwargs) -> dict:
    return build_report(load_spec(spec_path(name)), **kwargs)


@pytest.mark.parametrize("name, total, active", [
    ("scout", 109e9, 17e9),
    ("maverick", 400e9, 17e9),
])
def test_published_parameter_counts(name: str, total: float, active: float) -> None:
    report = report_of(name)
    assert report["params_total"] == pytest.approx(total, rel=0.01)
    assert report["params_active"] == pytest.approx(active, rel=0.03)


def test_behemoth_estimate_reproduces_the_published_totals() -> None:
    report = report_of("behemoth")
    assert report["estimate"] is True
    assert report["params_total"] == pytest.approx(2e12, rel=0.03)
    assert report["params_active"] == pytest.approx(288e9, rel=0.03)


@pytest.mark.parametrize("name", SHIPPED)
def test_report_is_consistent(name: str) -> None:
    report = report_of(name, context=100_000, budget_bytes=parse_size("80GB"))
    json.dumps(report)  # plain data
    breakdown = report["params_breakdown"]
    assert tuple(breakdown) == BREAKDOWN_KEYS
    assert sum(breakdown.values()) == report["params_total"]
    layer_sum = sum(row["params"] for row in report["layers"])
    final_norm = load_spec(spec_path(name)).hidden_size
    non_layer = breakdown["embedding"] + breakdown["lm_head"] + breakdown["vision"] + final_norm
    assert layer_sum + non_layer == report["params_total"]
    assert report["params_active"] <= report["params_total"] - breakdown["vision"]
    assert set(report["weight_bytes"]) == set(DTYPES) == set(report["fits"])
    assert "parameters" in format_report(report)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_reports_format(name: str) -> None:
    text = format_report(report_of(name, context=1 << 20, dtype="fp8"))
    assert name in text and "KV cache (fp8)" in text
    assert ("estimate" in text) == (name == "behemoth")


def test_scout_chunked_kv_cache_at_1m() -> None:
    kv = report_of("scout", context=1 << 20)["kv_cache"]
    assert kv["ratio"] <= 0.3
    # 12 global layers keep 1M positions, 36 chunked layers keep 8192
    per_position = 2 * 8 * 128 * 2
    assert kv["bytes_chunked"] == per_position * (12 * (1 << 20) + 36 * 8192)
    assert kv["bytes_naive"] == per_position * 48 * (1 << 20) == \
        kv["bytes_per_token_naive"] * (1 << 20)


def test_short_context_saves_nothing() -> None:
    kv = report_of("scout", context=100)["kv_cache"]
    assert kv["bytes_chunked"] == kv["bytes_naive"]


def test_flops_per_token() -> None:
    spec = load_spec(spec_path("scout"))
    without = build_report(spec)
    assert without["flops_per_token"] == 2 * active_matmul_params(spec)
    with_context = build_report(spec, context=8192)
    # at 8192 every layer sees 8192 keys: 4 * heads * head_dim * keys per layer
    assert with_context["flops_per_token"] - without["flops_per_token"] == 4 * 40 * 128 * 8192 * 48


def test_weight_bytes_and_fits() -> None:
    report = report_of("tiny-scout", context=16, budget_bytes=500_000)
    total = report["params_total"]
    assert report["weight_bytes"]["float32"] == 4 * total
    assert report["weight_bytes"]["fp8"] == total
    assert report["weight_bytes"]["int4"] == -(-total // 2) + 2 * -(-total // 64)   # blocks of 64, as built
    kv = report["kv_cache"]["bytes_chunked"]
    expected = {d: b + kv <= 500_000 for d, b in report["weight_bytes"].items()}
    assert report["fits"] == expected
    assert report["fits"]["int4"] and not report["fits"]["float32"]


def test_storage_bytes_and_sizes() -> None:
    assert storage_bytes(64, "int4") == 32 + 2 and storage_bytes(64, "int4", 32) == 32 + 2 * 2
    assert storage_bytes(10, "bf16") == 20
    assert canonical_dtype("FP16") == "float16"
    with pytest.raises(ValueError, match="unknown dtype"):
        canonical_dtype("int3")
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("1.5e3") == 1500
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("kwargs", [{"context": 0}, {"budget_bytes": -1}, {"dtype": "int3"}])
def test_bad_report_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        report_of("tiny-scout", **kwargs)


# -- parity with transformers ----------------------------------------------------------

def hf_text_config(spec: ModelSpec):
    from transformers import Llama4TextConfig
    a, scaling = spec.attention, spec.attention.rope.scaling
    rope = {"rope_type": "default", "rope_theta": a.rope.theta}
    if scaling is not None:
        rope.update(rope_type="llama3", factor=scaling.factor,
                    low_freq_factor=scaling.low_freq_factor,
                    high_freq_factor=scaling.high_freq_factor,
                    original_max_position_embeddings=scaling.original_max_position_embeddings)
    return Llama4TextConfig(
        hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        vocab_size=spec.vocab_size, num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
        intermediate_size=spec.moe.intermediate_size,
        intermediate_size_mlp=spec.dense_intermediate_size,
        num_local_experts=spec.moe.num_experts, num_experts_per_tok=spec.moe.top_k,
        moe_layers=list(spec.moe_layers),
        no_rope_layers=[int(layer.rope) for layer in spec.layers],
        use_qk_norm=a.qk_norm, attention_chunk_size=a.chunk_size,
        attn_temperature_tuning=a.temperature_tuning is not None, rope_parameters=rope,
        tie_word_embeddings=spec.tie_word_embeddings, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings)


def hf_vision_config(vision: VisionSpec):
    from transformers import Llama4VisionConfig
    v = vision
    return Llama4VisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
        vision_output_dim=v.vision_output_dim, projector_input_dim=v.projector_input_dim,
        projector_output_dim=v.projector_output_dim, pixel_shuffle_ratio=v.pixel_shuffle_ratio,
        norm_eps=v.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": v.rope_theta})


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
@pytest.mark.parametrize("tied", [False, True])
def test_text_params_match_transformers(name: str, tied: bool) -> None:
    import transformers
    spec = dataclasses.replace(load_spec(spec_path(name)), tie_word_embeddings=tied)
    model = transformers.Llama4ForCausalLM(hf_text_config(spec))
    assert numel(model) == build_report(spec)["params_total"]


def test_vision_params_match_transformers() -> None:
    import transformers
    spec = dataclasses.replace(load_spec(spec_path("tiny-scout")), vision=TINY_VISION)
    config = transformers.Llama4Config(vision_config=hf_vision_config(TINY_VISION).to_dict(),
                                       text_config=hf_text_config(spec).to_dict())
    model = transformers.Llama4ForConditionalGeneration(config)
    report = build_report(spec)
    assert numel(model) == report["params_total"]
    vision_numel = numel(model.vision_model) + numel(model.multi_modal_projector)
    assert vision_numel == report["params_breakdown"]["vision"]


def test_scout_fits_80gb_at_int4_as_built() -> None:
    report = report_of("scout", context=100_000, budget_bytes=parse_size("80GB"))
    assert report["fits_quantized_build"] == {"fp8": False, "int8": False, "int4": True}
    # the build keeps the router and norms in bfloat16 and the embedding table at 8 bits: a little over pure int4
    assert report["weight_bytes"]["int4"] < report["quantized_build_bytes"]["int4"] < 70e9
    assert "verdict: scout fits 80.00 GB at build --quantize int4" in format_report(report)
    maverick = report_of("maverick", budget_bytes=parse_size("80GB"))
    assert "verdict: maverick does not fit 80.00 GB at any dtype" in format_report(maverick)
