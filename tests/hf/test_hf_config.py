"""config.json <-> spec: transformers' defaults and layouts, the released configs' quirks, round trips,
and a clear error naming the key for everything a spec cannot express."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest

from l4compile.errors import SpecError
from l4compile.hf import hf_config_from_spec, spec_from_hf_config
from l4compile.hf.config import math_fields
from l4compile.hf.config_keys import MULTIMODAL_DEFAULTS, TEXT_DEFAULTS, VISION_DEFAULTS
from l4compile.spec.params import active_params, params_breakdown
from tests.conftest import load
from tests.hf.conftest import TINY_VISION, text_config


def tiny_dict(**overrides) -> dict:
    return text_config(**overrides).to_dict()


def multimodal_dict(text: dict | None = None, **vision) -> dict:
    return {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": text or tiny_dict(), "vision_config": {**TINY_VISION, **vision},
            "image_token_index": 95}


def field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_defaults_are_transformers_defaults():
    from transformers import Llama4Config, Llama4TextConfig, Llama4VisionConfig
    for ours, cls in ((TEXT_DEFAULTS, Llama4TextConfig), (VISION_DEFAULTS, Llama4VisionConfig),
                      (MULTIMODAL_DEFAULTS, Llama4Config)):
        theirs = field_defaults(cls)
        shared = set(ours) & set(theirs)
        assert len(shared) >= len(ours) - 4  # legacy keys only we list
        assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}, cls.__name__
    assert TEXT_DEFAULTS["rope_theta"] == Llama4TextConfig.default_theta
    assert VISION_DEFAULTS["rope_theta"] == Llama4VisionConfig.default_theta


def test_absent_keys_mean_what_transformers_makes_of_them():
    from transformers import Llama4TextConfig
    minimal = {"model_type": "llama4_text", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
               "num_key_value_heads": 2, "num_hidden_layers": 8, "vocab_size": 300,
               "interleave_moe_layer_step": 2}
    resolved = Llama4TextConfig(**minimal).to_dict()  # every key written out by transformers
    ours, theirs = spec_from_hf_config(minimal, "m"), spec_from_hf_config(resolved, "m")
    assert ours == theirs
    assert ours.nope_layers == (3, 7) and ours.moe_layers == (1, 3, 5, 7) and ours.attention.chunk_size == 8192
    assert ours.attention.rope.theta == 500000.0 and ours.attention.qk_norm and ours.moe.num_experts == 16


def released_scout_config() -> dict:
    """The released Llama-4-Scout-17B-16E config.json's layout and values (transformers 4.51 era)."""
    text = {
        "_attn_implementation_autoset": True, "attention_bias": False, "attention_chunk_size": 8192,
        "attention_dropout": 0.0, "attn_scale": 0.1, "attn_temperature_tuning": 4, "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192, "for_llm_compressor": False,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
        "interleave_moe_layer_step": 1, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760, "model_type": "llama4_text", "moe_layers": list(range(48)),
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)], "num_attention_heads": 40,
        "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16,
        "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": True, "vocab_size": 202048}
    vision = {
        "_attn_implementation_autoset": True, "attention_dropout": 0.0, "hidden_act": "gelu",
        "hidden_size": 1408, "image_size": 336, "initializer_range": 0.02, "intermediate_size": 5632,
        "model_type": "llama4_vision_model", "multi_modal_projector_bias": False, "norm_eps": 1e-05,
        "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 34, "patch_size": 14,
        "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0, "projector_input_dim": 4096,
        "projector_output_dim": 4096, "rope_theta": 10000, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default", "vision_output_dim": 4096}
    return {"architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080,
            "eoi_token_index": 200081, "image_token_index": 200092, "model_type": "llama4",
            "text_config": text, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0.dev0", "vision_config": vision}


def test_released_scout_config_imports_as_scout():
    spec = spec_from_hf_config(released_scout_config(), "scout")
    assert math_fields(spec) == math_fields(load("scout"))  # the spec we ship describes the same model
    assert spec.attention.temperature_tuning is not None  # `attn_temperature_tuning: 4` means on
    assert spec.tokens.eos == (200001, 200007, 200008) and spec.tokens.image == 200092
    assert spec.vision == load("scout").vision
    total, active = sum(params_breakdown(spec).values()), active_params(spec)
    assert round(total / 1e9) == 109 and round(active / 1e9) == 17


@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
def test_spec_to_config_and_back(name):
    from transformers import Llama4TextConfig
    spec = load(name)
    config = hf_config_from_spec(spec)
    assert math_fields(spec_from_hf_config(config, name)) == math_fields(spec)
    # transformers resolves our config to the same model (all its derived fields agree)
    resolved = Llama4TextConfig(**config).to_dict()
    assert math_fields(spec_from_hf_config(resolved, name)) == math_fields(spec)


def test_explicit_lists_round_trip():
    spec = spec_from_hf_config(tiny_dict(num_hidden_layers=6, moe_layers=[0, 5],
                                         no_rope_layers=[1, 0, 0, 1, 1, 1]), "lists")
    assert spec.nope_layers == (1, 2) and spec.moe_layers == (0, 5)
    assert spec_from_hf_config(hf_config_from_spec(spec), "lists") == spec


def test_multimodal_config_carries_vision():
    spec = spec_from_hf_config(multimodal_dict(), "mm")
    assert spec.vision.hidden_size == 16 and spec.vision.vision_output_dim == 32
    assert spec.vision.rope_theta == 10000.0 and spec.tokens.image == 95


def test_shared_expert_is_required_for_export():
    spec = load("tiny-scout")
    no_shared = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, shared_expert=False))
    with pytest.raises(SpecError, match="shared_expert"):
        hf_config_from_spec(no_shared)


def _set(path: str, value):
    def edit(config: dict) -> None:
        *parents, leaf = path.split(".")
        for key in parents:
            config = config[key]
        if value is _DELETE:
            del config[leaf]
        else:
            config[leaf] = value
    return edit


_DELETE = object()
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
TEXT_ERRORS = {
    "attention_bias": _set("attention_bias", True),
    "hidden_act": _set("hidden_act", "gelu"),
    "rope_parameters.rope_type": _set("rope_parameters", {"rope_type": "yarn", "factor": 4.0}),
    "rope_parameters.factor": _set("rope_parameters", {k: v for k, v in LLAMA3.items() if k != "factor"}),
    "rope_parameters.partial_rotary_factor": _set("rope_parameters", {**LLAMA3, "partial_rotary_factor": 0.5}),
    "rope_parameters.mscale": _set("rope_parameters", {**LLAMA3, "mscale": 1.0}),
    "rope_scaling.rope_type": lambda c: (c.pop("rope_parameters"),
                                         c.update(rope_scaling={"type": "dynamic", "factor": 2.0})),
    "layer_types": _set("layer_types", ["chunked_attention"] * 4),                  # chunks a NoPE layer
    "no_rope_layers": _set("no_rope_layers", [1, 1, 0]),                            # shorter than the model
    "moe_layers": _set("moe_layers", [1, 4]),                                       # no layer 4
    "use_fancy_norm": _set("use_fancy_norm", True),                                 # unknown key
    "quantization_config": _set("quantization_config", {"quant_method": "fbgemm_fp8"}),
    "model_type": _set("model_type", "llama"),
    "head_dim": _set("head_dim", 16),                                               # 4 * 16 != 32
    "num_key_value_heads": _set("num_key_value_heads", 3),
    "eos_token_id": _set("eos_token_id", [2, 500]),                                  # outside the vocab
    "num_hidden_layers": _set("num_hidden_layers", "four"),
}


@pytest.mark.parametrize("key", list(TEXT_ERRORS))
def test_unsupported_text_config_names_the_key(key):
    config = tiny_dict()
    TEXT_ERRORS[key](config)
    with pytest.raises(SpecError) as info:
        spec_from_hf_config(config, "bad", "ckpt/config.json")
    message = str(info.value)
    assert message.startswith(f"ckpt/config.json: {key}: ") and "\n" not in message


def test_layer_types_that_mix_patterns_are_refused():
    types = ["full_attention", "chunked_attention", "chunked_attention", "full_attention"]
    with pytest.raises(SpecError, match="layer_types: layer 0 is a RoPE layer with 'full_attention'"):
        spec_from_hf_config(tiny_dict(layer_types=types), "bad")
    with pytest.raises(SpecError, match="layer_types"):  # chunked layers need a chunk size
        spec_from_hf_config(tiny_dict(attention_chunk_size=None, layer_types=types[1:] + types[:1]), "bad")


MULTIMODAL_ERRORS = {
    "image_token_index": lambda c: c.update(image_token_index=200092),               # outside the vocab
    "vision_config.hidden_act": _set("vision_config.hidden_act", "relu"),
    "vision_config.intermediate_size": _set("vision_config.intermediate_size", 60),  # not 16 / 0.5**2
    "vision_config.multi_modal_projector_bias": _set("vision_config.multi_modal_projector_bias", True),
    "text_config.attention_bias": _set("text_config.attention_bias", True),
    "vision_config.vision_feature_layer": _set("vision_config.vision_feature_layer", -2),
    "vision_config.vision_feature_select_strategy": _set("vision_config.vision_feature_select_strategy", "full"),
    "vision_config.norm_eps": _set("vision_config.norm_eps", 1e-6),   # transformers' LayerNorms ignore it
    "vision_config.pixel_shuffle_ratio": _set("vision_config.pixel_shuffle_ratio", 0.25),
    "vision_config.projector_output_dim": _set("vision_config.projector_output_dim", 48),
}


@pytest.mark.parametrize("key", list(MULTIMODAL_ERRORS))
def test_unsupported_multimodal_config_names_the_key(key):
    config = copy.deepcopy(multimodal_dict())
    MULTIMODAL_ERRORS[key](config)
    with pytest.raises(SpecError, match=f"config.json: {key.replace('.', '[.]')}: "):
        spec_from_hf_config(config, "bad")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_import_error_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_dict(attention_bias=True)))
    r = cli("import-hf", tmp_path, "-o", tmp_path / "spec.yaml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "attention_bias" in r.stderr
    assert not (tmp_path / "spec.yaml").exists()
    (tmp_path / "config.json").write_text("{not json")
    r = cli("import-hf", tmp_path)
    assert r.returncode == 2 and "invalid JSON" in r.stderr and r.stderr.strip().count("\n") == 0


def test_cli_import_writes_a_loadable_spec(tmp_path):
    from l4compile.spec import load_spec
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(multimodal_dict()))
    r = cli("import-hf", tmp_path / "ckpt", "-o", tmp_path / "specs" / "mm.yaml")
    assert r.returncode == 0, r.stderr
    spec = load_spec(tmp_path / "specs" / "mm.yaml")
    assert spec.name == "ckpt" and spec.vision is not None
    assert spec == dataclasses.replace(spec_from_hf_config(multimodal_dict(), "ckpt"), source=spec.source)
