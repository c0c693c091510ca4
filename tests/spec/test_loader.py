"""Loading the shipped specs, layer patterns, defaults and the dump/load round trip."""

from __future__ import annotations

import dataclasses

import pytest

from l4compile.errors import SpecError
from l4compile.spec import (ModelSpec, TemperatureTuning, VisionSpec, dump_spec_yaml, load_spec,
                            loads_spec, spec_to_dict)

from .conftest import SHIPPED, spec_path

MINIMAL = """\
name: minimal
text:
  hidden_size: 64
  num_layers: 8
  vocab_size: 256
  layers: {nope_interval: 4}
  attention: {num_heads: 4, num_kv_heads: 2, chunk_size: null, qk_norm: false}
  dense_intermediate_size: 128
"""


def without_source(spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, source=None)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_loads(name: str) -> None:
    spec = load_spec(spec_path(name))
    assert spec.name == name
    assert spec.source == str(spec_path(name))
    assert len(spec.layers) == spec.num_layers


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip(name: str) -> None:
    spec = load_spec(spec_path(name))
    again = loads_spec(dump_spec_yaml(spec))
    assert again == without_source(spec)
    assert again.content_hash() == spec.content_hash()
    assert spec.to_dict() == spec_to_dict(spec)


def test_scout_layer_pattern() -> None:
    spec = load_spec(spec_path("scout"))
    assert spec.moe_layers == tuple(range(48))
    assert spec.nope_layers == tuple(range(3, 48, 4))
    layer0, layer3 = spec.layers[0], spec.layers[3]
    assert (layer0.rope, layer0.attention, layer0.qk_norm, layer0.temperature_tuning) == \
        (True, "chunked", True, False)
    assert (layer3.rope, layer3.attention, layer3.qk_norm, layer3.temperature_tuning) == \
        (False, "global", False, True)
    assert spec.attention.rope.scaling.factor == 16.0
    assert spec.max_position_embeddings == 10485760
    assert spec.tokens.eos == (200001, 200007, 200008)
    assert spec.vision == VisionSpec()


def test_maverick_layer_pattern() -> None:
    spec = load_spec(spec_path("maverick"))
    assert spec.moe_layers == tuple(range(1, 48, 2))
    assert [layer.ffn for layer in spec.layers[:4]] == ["dense", "moe", "dense", "moe"]
    assert spec.nope_layers == (3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47)
    assert not any(layer.qk_norm for layer in spec.layers)
    assert spec.attention.rope.scaling is None
    assert spec.moe.num_experts == 128


def test_behemoth_is_marked_estimate() -> None:
    spec = load_spec(spec_path("behemoth"))
    assert spec.estimate
    assert "estimate" in spec.description.lower()
    assert (spec.moe.num_experts, spec.moe.top_k) == (16, 1)


def test_tiny_maverick_pattern() -> None:
    spec = load_spec(spec_path("tiny-maverick"))
    assert spec.moe_layers == (1, 3)
    assert spec.nope_layers == (3,)
    assert spec.attention.kv_groups == 4


def test_defaults_of_a_minimal_spec() -> None:
    spec = loads_spec(MINIMAL)
    assert spec.source is None
    assert spec.attention.head_dim == 16
    assert spec.moe is None and spec.moe_layers == ()
    assert all(layer.attention == "global" and layer.ffn == "dense" for layer in spec.layers)
    assert spec.attention.temperature_tuning is None
    assert spec.rms_norm_eps == 1e-5
    assert spec.vision is None and spec.tokens.eos == ()
    assert loads_spec(dump_spec_yaml(spec)) == spec


def test_explicit_layer_lists_are_sorted_and_round_trip() -> None:
    text = MINIMAL.replace("layers: {nope_interval: 4}", "layers: {nope_layers: [5, 0]}")
    spec = loads_spec(text)
    assert spec.nope_layers == (0, 5)
    assert "nope_layers: [0, 5]" in dump_spec_yaml(spec)
    assert loads_spec(dump_spec_yaml(spec)) == spec


def test_moe_section_without_layer_keys_means_every_layer() -> None:
    text = MINIMAL + "  moe: {num_experts: 4, top_k: 2, intermediate_size: 32}\n"
    spec = loads_spec(text)
    assert spec.moe_layers == tuple(range(8))
    assert spec.moe.shared_expert and spec.moe.router_aux_loss_coef == 0.001


def test_empty_moe_list_means_all_dense() -> None:
    text = MINIMAL.replace("{nope_interval: 4}", "{nope_interval: 4, moe_layers: []}")
    text += "  moe: {num_experts: 4, top_k: 1, intermediate_size: 32}\n"
    spec = loads_spec(text)
    assert spec.moe_layers == ()
    assert loads_spec(dump_spec_yaml(spec)) == spec


@pytest.mark.parametrize("value, expected", [
    ("false", None), ("null", None), ("true", TemperatureTuning()),
    ("{floor_scale: 4}", TemperatureTuning(attn_scale=0.1, floor_scale=4)),
])
def test_temperature_tuning_forms(value: str, expected) -> None:
    text = MINIMAL.replace("qk_norm: false}", f"qk_norm: false, temperature_tuning: {value}}}")
    assert loads_spec(text).attention.temperature_tuning == expected


def test_plain_exponent_is_a_float() -> None:
    # PyYAML reads an unquoted 1e-6 as a string; the loader accepts it as the number.
    spec = loads_spec(MINIMAL + "  rms_norm_eps: 1e-6\n")
    assert spec.rms_norm_eps == 1e-6


def test_eos_may_be_one_id() -> None:
    spec = loads_spec(MINIMAL + "tokens: {eos: 7}\n")
    assert spec.tokens.eos == (7,)


def test_empty_vision_section_takes_the_defaults() -> None:
    spec = loads_spec(MINIMAL + "vision: {}\n")
    assert spec.vision == VisionSpec()


def test_did_you_mean() -> None:
    text = MINIMAL.replace("vocab_size:", "vocab_sise:")
    with pytest.raises(SpecError, match=r"did you mean 'vocab_size'\?") as info:
        loads_spec(text, source="typo.yaml")
    assert info.value.field == "text.vocab_sise"
    assert str(info.value).startswith("typo.yaml:5: text.vocab_sise: unknown field in text")


def test_unknown_key_without_close_match_lists_the_fields() -> None:
    with pytest.raises(SpecError, match="expected one of: name, description"):
        loads_spec(MINIMAL + "zzz: 1\n")
