"""ModelSpec -> plain data / YAML in the loader's layout.

`loads_spec(dump_spec_yaml(spec))` equals `spec` except for `source`. Every field
is written out (defaults included) so that a dump is a complete, explicit spec;
layer lists are written back as a pattern when one generates them exactly.
"""

from __future__ import annotations

from dataclasses import asdict

import yaml

from l4compile.spec.model import AttentionSpec, ModelSpec, TokenSpec
from l4compile.spec.patterns import find_moe_step, find_nope_interval


def spec_to_dict(spec: ModelSpec) -> dict:
    """Plain data (dicts, lists, scalars) in the YAML layout of specs/README.md."""
    out: dict = {"name": spec.name}
    if spec.description:
        out["description"] = spec.description
    out["estimate"] = spec.estimate
    out["text"] = _text_to_dict(spec)
    tokens = _tokens_to_dict(spec.tokens)
    if tokens:
        out["tokens"] = tokens
    if spec.vision is not None:
        out["vision"] = asdict(spec.vision)
    return out


def dump_spec_yaml(spec: ModelSpec) -> str:
    """The spec as YAML text that `loads_spec` reads back."""
    return yaml.dump(spec_to_dict(spec), Dumper=_SpecDumper, sort_keys=False, width=100)


class _SpecDumper(yaml.SafeDumper):
    """Block mappings, flow lists: `eos: [200001, 200007]`, `nope_layers: [3, 7]`."""


_SpecDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                         flow_style=True))


def _text_to_dict(spec: ModelSpec) -> dict:
    text: dict = {
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
    }
    if spec.dense_intermediate_size is not None:
        text["dense_intermediate_size"] = spec.dense_intermediate_size
    text["layers"] = _layers_to_dict(spec)
    text["attention"] = _attention_to_dict(spec.attention)
    if spec.moe is not None:
        text["moe"] = asdict(spec.moe)
    return text


def _layers_to_dict(spec: ModelSpec) -> dict:
    layers: dict = {}
    interval = find_nope_interval(spec.num_layers, spec.nope_layers)
    if interval is not None:
        layers["nope_interval"] = interval
    else:
        layers["nope_layers"] = list(spec.nope_layers)
    step = find_moe_step(spec.num_layers, spec.moe_layers)
    if step is not None:
        layers["moe_interleave_step"] = step
    else:
        layers["moe_layers"] = list(spec.moe_layers)
    return layers


def _attention_to_dict(attention: AttentionSpec) -> dict:
    tuning = attention.temperature_tuning
    scaling = attention.rope.scaling
    return {
        "num_heads": attention.num_heads,
        "num_kv_heads": attention.num_kv_heads,
        "head_dim": attention.head_dim,
        "chunk_size": attention.chunk_size,
        "qk_norm": attention.qk_norm,
        "temperature_tuning": False if tuning is None else asdict(tuning),
        "rope": {"theta": attention.rope.theta,
                 "scaling": None if scaling is None else asdict(scaling)},
    }


def _tokens_to_dict(tokens: TokenSpec) -> dict:
    out: dict = {}
    for key in ("bos", "eos", "pad", "image"):
        value = getattr(tokens, key)
        if key == "eos":
            value = list(value) or None
        if value is not None:
            out[key] = value
    return out
