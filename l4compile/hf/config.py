"""Hugging Face config.json <-> ModelSpec.

`spec_from_hf_config` reads a Llama4ForCausalLM (`llama4_text`) or
Llama4ForConditionalGeneration (`llama4`, text + vision) config the way
transformers does, and refuses, naming the key, anything a spec cannot
express. `hf_config_from_spec` writes the Llama4ForCausalLM config that
transformers builds the same model from.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from l4compile.errors import SpecError, WeightError
from l4compile.hf.config_keys import (GENERIC_KEYS, LAYER_TYPES, MULTIMODAL_DEFAULTS, SPEC_FIELD_KEYS,
                                      TEXT_DEFAULTS, VISION_DEFAULTS, VISION_FIELDS)
from l4compile.hf.config_reader import ConfigSection
from l4compile.hf.config_rope import read_rope, rope_parameters
from l4compile.spec.dump import dump_spec_yaml
from l4compile.spec.loader import loads_spec
from l4compile.spec.model import MAX_LAYERS
from l4compile.spec.model import (AttentionSpec, ModelSpec, MoESpec, TemperatureTuning, TokenSpec,
                                  VisionSpec)
from l4compile.spec.patterns import find_moe_step, find_nope_interval, moe_layers_from_step

CONFIG_FILE = "config.json"
TEXT_TYPE, MULTIMODAL_TYPE = "llama4_text", "llama4"


def load_hf_config(path: str | Path) -> tuple[dict, Path]:
    """The JSON of a checkpoint's config.json (`path` is the directory or the file) and its path."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError("config file not found", file=str(file)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read config file ({exc})", file=str(file)) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"invalid JSON: {exc.msg}", file=str(file), line=exc.lineno) from None
    return data, file


def spec_from_hf_config(config: dict, name: str, source: str = CONFIG_FILE) -> ModelSpec:
    """The spec of the model transformers builds from `config` (text model, vision tower carried)."""
    if not isinstance(config, dict):
        raise SpecError("expected a JSON object at the top level", file=source)
    model_type = config.get("model_type") or (MULTIMODAL_TYPE if "text_config" in config else TEXT_TYPE)
    vision = image_token = None
    if model_type == TEXT_TYPE:
        text = ConfigSection(config, file=source, path="", defaults=TEXT_DEFAULTS, ignored=GENERIC_KEYS)
    elif model_type == MULTIMODAL_TYPE:
        top = ConfigSection(config, file=source, path="", defaults=MULTIMODAL_DEFAULTS, ignored=GENERIC_KEYS)
        text = top.section("text_config", TEXT_DEFAULTS, GENERIC_KEYS)
        if top.raw("vision_config") is not None:
            vision = _read_vision(top.section("vision_config", VISION_DEFAULTS, GENERIC_KEYS))
        image_token = top.int("image_token_index", minimum=0)
    else:
        raise SpecError(f"expected '{TEXT_TYPE}' or '{MULTIMODAL_TYPE}' (a Llama 4 config), found "
                        f"{model_type!r}", file=source, field="model_type")
    spec = ModelSpec(name=name, description=f"imported from a Hugging Face {model_type} config",
                     vision=vision, tokens=_read_tokens(text, image_token), **_read_text(text))
    return _validated(spec, text)


def _read_text(text: ConfigSection) -> dict:
    text.expect("hidden_act", "silu", "Llama 4's SwiGLU feed-forward")
    text.expect("attention_bias", False, "Llama 4's projections have no bias")
    num_layers = text.int("num_hidden_layers")
    if num_layers > MAX_LAYERS:
        raise text.error("num_hidden_layers", f"expected at most {MAX_LAYERS:,} (the most layers a build holds), "
                                              f"found {num_layers:,}")
    hidden, heads = text.int("hidden_size"), text.int("num_attention_heads")
    kv_heads = heads if text.raw("num_key_value_heads") is None else text.int("num_key_value_heads")
    head_dim = hidden // heads if text.raw("head_dim") is None else text.int("head_dim")
    nope = _nope_layers(text, num_layers)
    chunk = _chunk_size(text, num_layers, nope)
    tuning = None
    if text.bool("attn_temperature_tuning", allow_int=True):
        tuning = TemperatureTuning(attn_scale=text.float("attn_scale", positive=False),
                                   floor_scale=text.int("floor_scale"))
    attention = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, chunk_size=chunk,
                              qk_norm=text.bool("use_qk_norm"), temperature_tuning=tuning, rope=read_rope(text))
    top_k, experts = text.int("num_experts_per_tok"), text.int("num_local_experts")
    moe = MoESpec(num_experts=experts, top_k=top_k, intermediate_size=text.int("intermediate_size"),
                  shared_expert=True, router_aux_loss_coef=text.float("router_aux_loss_coef", positive=False))
    return dict(hidden_size=hidden, num_layers=num_layers, vocab_size=text.int("vocab_size"),
                attention=attention, nope_layers=nope, moe_layers=_moe_layers(text, num_layers), moe=moe,
                dense_intermediate_size=text.int("intermediate_size_mlp"),
                rms_norm_eps=text.float("rms_norm_eps"),
                max_position_embeddings=text.int("max_position_embeddings"),
                tie_word_embeddings=text.bool("tie_word_embeddings"))


def _nope_layers(text: ConfigSection, num_layers: int) -> tuple[int, ...]:
    """`no_rope_layers[i]` is 1 when layer i USES rope (transformers' naming); empty or null
    means every `no_rope_layer_interval`-th layer is NoPE."""
    flags = text.int_list("no_rope_layers")
    if not flags:
        interval = text.int("no_rope_layer_interval")
        return tuple(i for i in range(num_layers) if (i + 1) % interval == 0)
    if len(flags) < num_layers or any(flag not in (0, 1) for flag in flags):
        raise text.error("no_rope_layers", f"expected one 0 (NoPE) or 1 (RoPE) per layer, {num_layers} "
                                           f"layers, found {flags}")
    return tuple(i for i in range(num_layers) if not flags[i])


def _chunk_size(text: ConfigSection, num_layers: int, nope: tuple[int, ...]) -> int | None:
    """attention_chunk_size, checked against `layer_types`: our spec chunks exactly the RoPE layers
    (or none, with chunk_size null), so layer_types must be one of those two patterns."""
    chunk = text.int("attention_chunk_size", nullable=True)
    types = text.raw("layer_types")
    if types is None:
        return chunk
    if not isinstance(types, list) or len(types) < num_layers or any(t not in LAYER_TYPES for t in types):
        raise text.error("layer_types", f"expected one of {LAYER_TYPES} per layer ({num_layers} layers), "
                                        f"found {types}")
    chunked = ["chunked_attention" if i not in nope else "full_attention" for i in range(num_layers)]
    if types[:num_layers] == ["full_attention"] * num_layers:
        return None  # every layer attends globally, whatever attention_chunk_size says
    if chunk is not None and types[:num_layers] == chunked:
        return chunk
    i = next(i for i in range(num_layers) if types[i] != (chunked[i] if chunk is not None else "full_attention"))
    kind = "RoPE" if i not in nope else "NoPE"
    raise text.error("layer_types", f"layer {i} is a {kind} layer with {types[i]!r}: a spec can only chunk "
                                    "every RoPE layer (with attention_chunk_size set) or no layer")


def _moe_layers(text: ConfigSection, num_layers: int) -> tuple[int, ...]:
    layers = text.int_list("moe_layers")
    if layers is None:
        return moe_layers_from_step(num_layers, text.int("interleave_moe_layer_step"))
    if any(i >= num_layers for i in layers) or len(set(layers)) != len(layers):
        raise text.error("moe_layers", f"expected distinct layer indices in [0, {num_layers}), found {layers}")
    return tuple(sorted(layers))


def _read_tokens(text: ConfigSection, image: int | None) -> TokenSpec:
    eos = text.int_list("eos_token_id", allow_scalar=True) or []
    return TokenSpec(bos=text.int("bos_token_id", minimum=0, nullable=True), eos=tuple(eos),
                     pad=text.int("pad_token_id", minimum=0, nullable=True), image=image)


def _read_vision(vision: ConfigSection) -> VisionSpec:
    vision.expect("hidden_act", "gelu", "the Llama 4 vision encoder's MLP")
    vision.expect("multi_modal_projector_bias", False, "Llama 4's projector has no bias")
    vision.expect("vision_feature_select_strategy", "default", "the only strategy Llama 4 uses")
    vision.expect("vision_feature_layer", -1, "features come from the last encoder layer")
    vision.expect("norm_eps", 1e-5, "transformers builds the vision LayerNorms with eps 1e-5 whatever norm_eps says")
    values = {field: vision.int(key) for field, key in VISION_FIELDS.items()
              if key not in ("pixel_shuffle_ratio", "norm_eps")}
    rope = read_rope(vision)
    if rope.scaling is not None:
        raise vision.error("rope_parameters", "expected no rope scaling in the vision tower")
    return VisionSpec(pixel_shuffle_ratio=vision.float("pixel_shuffle_ratio"), norm_eps=vision.float("norm_eps"),
                      rope_theta=rope.theta, **values)


def _validated(spec: ModelSpec, text: ConfigSection) -> ModelSpec:
    """Round-trip through the spec loader, so an imported spec obeys every rule a written one does;
    a violation names the config key it comes from."""
    try:
        loaded = loads_spec(dump_spec_yaml(spec))
    except SpecError as exc:
        field = exc.field or ""
        if field.startswith("vision."):
            key = "vision_config." + VISION_FIELDS.get(field[len("vision."):], field[len("vision."):])
        elif field == "tokens.image":
            key = "image_token_index"
        else:
            key = text.field(SPEC_FIELD_KEYS.get(field, field))
        raise SpecError(f"{exc.detail} (spec field {field})", file=text.file, field=key) from None
    if loaded != spec:
        raise SpecError("the spec written from this config does not read back the same (an l4compile bug)",
                        file=text.file)
    return loaded


def hf_config_from_spec(spec: ModelSpec, dtype: str = "float32") -> dict:
    """The config.json of the Llama4ForCausalLM that computes what `spec` computes (text model)."""
    att, moe, n = spec.attention, spec.moe, spec.num_layers
    if moe is not None and not moe.shared_expert:
        raise SpecError("transformers' Llama 4 MoE always has a shared expert; this spec has none",
                        file=spec.source, field="text.moe.shared_expert")
    tuning = att.temperature_tuning or TemperatureTuning()
    eos = list(spec.tokens.eos)
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": TEXT_TYPE, "dtype": dtype,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "num_hidden_layers": n,
        "num_attention_heads": att.num_heads, "num_key_value_heads": att.num_kv_heads, "head_dim": att.head_dim,
        "hidden_act": "silu", "attention_bias": False, "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings, "tie_word_embeddings": spec.tie_word_embeddings,
        "intermediate_size": moe.intermediate_size if moe else TEXT_DEFAULTS["intermediate_size"],
        "intermediate_size_mlp": spec.dense_intermediate_size or TEXT_DEFAULTS["intermediate_size_mlp"],
        "num_local_experts": moe.num_experts if moe else TEXT_DEFAULTS["num_local_experts"],
        "num_experts_per_tok": moe.top_k if moe else TEXT_DEFAULTS["num_experts_per_tok"],
        "router_aux_loss_coef": moe.router_aux_loss_coef if moe else TEXT_DEFAULTS["router_aux_loss_coef"],
        "moe_layers": list(spec.moe_layers),
        "interleave_moe_layer_step": find_moe_step(n, spec.moe_layers) or 1,
        "no_rope_layers": [int(i not in spec.nope_layers) for i in range(n)],
        "no_rope_layer_interval": find_nope_interval(n, spec.nope_layers) or 4,
        "layer_types": [f"{layer.attention.replace('global', 'full')}_attention" for layer in spec.layers],
        "attention_chunk_size": att.chunk_size, "use_qk_norm": att.qk_norm,
        "attn_temperature_tuning": att.temperature_tuning is not None,
        "attn_scale": tuning.attn_scale, "floor_scale": tuning.floor_scale,
        "rope_parameters": rope_parameters(att.rope),
        "bos_token_id": spec.tokens.bos, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.tokens.pad,
    }


def hf_multimodal_config_from_spec(spec: ModelSpec, dtype: str = "float32") -> dict:
    """The config.json of the Llama4ForConditionalGeneration that computes what `spec` (with vision) computes."""
    text = hf_config_from_spec(spec, dtype)
    text.pop("architectures")
    v = spec.vision
    vision = {
        "model_type": "llama4_vision_model", "hidden_act": "gelu", "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
        "intermediate_size": v.intermediate_size, "vision_output_dim": v.vision_output_dim,
        "image_size": v.image_size, "patch_size": v.patch_size, "norm_eps": v.norm_eps,
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio, "projector_input_dim": v.projector_input_dim,
        "projector_output_dim": v.projector_output_dim, "multi_modal_projector_bias": False,
        "vision_feature_select_strategy": "default", "vision_feature_layer": -1,
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
    }
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": MULTIMODAL_TYPE, "dtype": dtype,
            "text_config": text, "vision_config": vision, "image_token_index": spec.tokens.image,
            "tie_word_embeddings": spec.tie_word_embeddings, "pad_token_id": spec.tokens.pad}


def math_fields(spec: ModelSpec) -> dict[str, object]:
    """The spec's fields that change the text model's logits, flattened (`attention.rope.theta`)."""
    data = asdict(spec)
    for key in ("name", "description", "estimate", "source", "tokens", "vision", "max_position_embeddings"):
        data.pop(key)
    data["moe"] = {k: v for k, v in (data["moe"] or {}).items() if k != "router_aux_loss_coef"} \
        if spec.moe_layers else None
    if len(spec.moe_layers) == spec.num_layers:
        data["dense_intermediate_size"] = None
    if not spec.nope_layers:
        data["attention"]["temperature_tuning"] = None
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value
    walk("", data)
    return flat


def check_config_matches(directory: Path, spec: ModelSpec) -> None:
    """A checkpoint with a config.json must describe the spec's math (else its weights would run
    through a different model and give wrong logits without any error)."""
    if not (directory / CONFIG_FILE).is_file():
        return
    config, file = load_hf_config(directory)
    theirs = math_fields(spec_from_hf_config(config, spec.name, str(file)))
    for key, ours in math_fields(spec).items():
        if theirs.get(key) != ours:
            raise WeightError(f"{file}: the checkpoint's config disagrees with the spec on {key}: "
                              f"{theirs.get(key)!r} in config.json, {ours!r} in the spec")
