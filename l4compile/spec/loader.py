"""YAML spec file -> validated ModelSpec.

Every error is a SpecError naming the file, the line and the dotted field, what
was expected and what was found. The YAML layout is documented in specs/README.md.
"""

from __future__ import annotations

from pathlib import Path

from yaml.nodes import ScalarNode

from l4compile.errors import SpecError
from l4compile.spec.extras import TOKEN_FIELDS, VISION_FIELDS, read_tokens, read_vision
from l4compile.spec.model import (MAX_LAYERS, MAX_WEIGHT_BYTES, AttentionSpec, ModelSpec, MoESpec,
                                  RopeScaling, RopeSpec, TemperatureTuning)
from l4compile.spec.patterns import moe_layers_from_step, nope_layers_from_interval
from l4compile.spec.yamlnode import (Section, compose_document, default_of, describe, is_null,
                                     scalar_value)

MAX_SPEC_BYTES = 16 << 20
TOP_FIELDS = ("name", "description", "estimate", "text", "tokens", "vision")
TEXT_FIELDS = ("hidden_size", "num_layers", "vocab_size", "rms_norm_eps", "max_position_embeddings",
               "tie_word_embeddings", "dense_intermediate_size", "layers", "attention", "moe")
LAYERS_FIELDS = ("nope_interval", "nope_layers", "moe_interleave_step", "moe_layers")
ATTENTION_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "chunk_size", "qk_norm",
                    "temperature_tuning", "rope")
TEMPERATURE_FIELDS = ("attn_scale", "floor_scale")
ROPE_FIELDS = ("theta", "scaling")
SCALING_FIELDS = ("type", "factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")
MOE_FIELDS = ("num_experts", "top_k", "intermediate_size", "shared_expert", "router_aux_loss_coef")


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate a spec file."""
    file = str(path)
    try:
        with open(path, "rb") as f:   # bounded: /dev/zero, or a huge file given by mistake, must not fill memory
            data = f.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(f"larger than {MAX_SPEC_BYTES >> 20} MiB: not a spec (the shipped ones are a few KB)",
                            file=file)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SpecError("spec file not found", file=file) from None
    except IsADirectoryError:
        raise SpecError("expected a spec file, found a directory", file=file) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"not a UTF-8 text file ({exc.reason})", file=file) from None
    except OSError as exc:
        raise SpecError(f"cannot read spec file: {exc.strerror}", file=file) from None
    return loads_spec(text, source=file)


def loads_spec(text: str, source: str = "<string>") -> ModelSpec:
    """Validate a spec given as YAML text; `source` names it in errors."""
    top = Section(compose_document(text, source), file=source, path="", line=1,
                  allowed=TOP_FIELDS)
    name = top.str("name", nonempty=True)
    description = top.str("description", default="")
    estimate = top.bool("estimate", default=False)
    text_sec = top.section("text", TEXT_FIELDS, required=True)
    spec = _read_text(text_sec)
    tokens = read_tokens(top.section("tokens", TOKEN_FIELDS, nullable=True), spec["vocab_size"])
    vision = read_vision(top.section("vision", VISION_FIELDS, nullable=True))
    model = ModelSpec(name=name, description=description, estimate=estimate, tokens=tokens,
                      vision=vision, source=None if source == "<string>" else source, **spec)
    _check_total_size(model, text_sec)
    return model


def _check_total_size(spec: ModelSpec, sec: Section) -> None:
    """Every weight, in float32, must be addressable with int64 byte offsets."""
    from l4compile.spec.params import params_breakdown
    total = 4 * sum(params_breakdown(spec).values())
    if total > MAX_WEIGHT_BYTES:
        raise SpecError(f"the model's weights take {total:.3e} bytes in float32, more than a build can address "
                        f"(2**63 - 1); reduce the sizes", file=sec.file, line=sec.line, field="text")


def _read_text(sec: Section) -> dict:
    hidden_size = sec.int("hidden_size")
    num_layers = sec.int("num_layers", maximum=MAX_LAYERS,
                         why="the most layers a build holds; the published models have 48")
    vocab_size = sec.int("vocab_size")
    attention = _read_attention(sec.section("attention", ATTENTION_FIELDS, required=True),
                                hidden_size)
    moe = _read_moe(sec.section("moe", MOE_FIELDS))
    nope_layers, moe_layers = _read_layers(sec, num_layers, moe_given=moe is not None)
    dense_size = sec.int("dense_intermediate_size", default=None)
    if dense_size is None and len(moe_layers) < num_layers:
        dense = [i for i in range(num_layers) if i not in set(moe_layers)]
        raise sec.error("dense_intermediate_size",
                        f"missing required field: layers {_short(dense)} are dense "
                        "(not MoE), so their FFN size must be given")
    return dict(
        hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size,
        attention=attention, nope_layers=nope_layers, moe_layers=moe_layers, moe=moe,
        dense_intermediate_size=dense_size,
        rms_norm_eps=sec.float("rms_norm_eps", default=default_of(ModelSpec, "rms_norm_eps")),
        max_position_embeddings=sec.int("max_position_embeddings",
                                        default=default_of(ModelSpec, "max_position_embeddings")),
        tie_word_embeddings=sec.bool("tie_word_embeddings", default=False),
    )


def _read_attention(sec: Section, hidden_size: int) -> AttentionSpec:
    num_heads = sec.int("num_heads")
    num_kv_heads = sec.int("num_kv_heads")
    head_dim = sec.int("head_dim", default=None)
    if head_dim is None:
        if hidden_size % num_heads:
            raise sec.error("num_heads", f"hidden_size {hidden_size} is not divisible by "
                                         f"num_heads {num_heads}; give head_dim explicitly")
        head_dim = hidden_size // num_heads
    head_key = "head_dim" if sec.has("head_dim") else "num_heads"
    if num_heads % num_kv_heads:
        raise sec.error("num_kv_heads", f"expected a divisor of num_heads {num_heads} "
                                        f"(grouped-query attention), found {num_kv_heads}")
    if num_heads * head_dim != hidden_size:
        raise sec.error(head_key, f"expected num_heads * head_dim == hidden_size {hidden_size}, "
                                  f"found {num_heads} * {head_dim} = {num_heads * head_dim}")
    if head_dim % 2:
        raise sec.error(head_key, f"expected an even head_dim (rotary rotates pairs), "
                                  f"found {head_dim}")
    if not sec.has("chunk_size"):
        raise sec.error("chunk_size", "missing required field (expected a positive integer, "
                                      "or null for global attention in every layer)")
    return AttentionSpec(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        chunk_size=sec.int("chunk_size", nullable=True),
        qk_norm=sec.bool("qk_norm"),
        temperature_tuning=_read_temperature_tuning(sec),
        rope=_read_rope(sec.section("rope", ROPE_FIELDS, nullable=True)),
    )


def _read_temperature_tuning(sec: Section) -> TemperatureTuning | None:
    """A mapping; `false`, null or absent disables it; `true` takes the defaults."""
    node = sec.node("temperature_tuning")
    if node is None or is_null(node):
        return None
    if isinstance(node, ScalarNode):
        enabled = scalar_value(node)
        if not isinstance(enabled, bool):
            raise sec.error("temperature_tuning", "expected a mapping {attn_scale, floor_scale}, "
                                                  f"false or null, found {describe(node)}")
        return TemperatureTuning() if enabled else None
    tuning = sec.section("temperature_tuning", TEMPERATURE_FIELDS)
    return TemperatureTuning(
        attn_scale=tuning.float("attn_scale", positive=False,
                                default=default_of(TemperatureTuning, "attn_scale")),
        floor_scale=tuning.int("floor_scale", default=default_of(TemperatureTuning, "floor_scale")),
    )


def _read_rope(sec: Section | None) -> RopeSpec:
    if sec is None:
        return RopeSpec()
    scaling = sec.section("scaling", SCALING_FIELDS, nullable=True)
    return RopeSpec(theta=sec.float("theta", default=default_of(RopeSpec, "theta")),
                    scaling=None if scaling is None else _read_scaling(scaling))


def _read_scaling(sec: Section) -> RopeScaling:
    kind = sec.str("type")
    if kind != "llama3":
        raise sec.error("type", f"expected 'llama3' (the only rope scaling Llama 4 uses), "
                                f"found {kind!r}")
    original = "original_max_position_embeddings"
    return RopeScaling(
        type="llama3",
        factor=sec.float("factor"),
        low_freq_factor=sec.float("low_freq_factor",
                                  default=default_of(RopeScaling, "low_freq_factor")),
        high_freq_factor=sec.float("high_freq_factor",
                                   default=default_of(RopeScaling, "high_freq_factor")),
        original_max_position_embeddings=sec.int(original,
                                                 default=default_of(RopeScaling, original)),
    )


def _read_moe(sec: Section | None) -> MoESpec | None:
    if sec is None:
        return None
    num_experts = sec.int("num_experts")
    top_k = sec.int("top_k")
    if top_k > num_experts:
        raise sec.error("top_k", f"expected at most num_experts ({num_experts}), found {top_k}")
    return MoESpec(
        num_experts=num_experts, top_k=top_k, intermediate_size=sec.int("intermediate_size"),
        shared_expert=sec.bool("shared_expert", default=default_of(MoESpec, "shared_expert")),
        router_aux_loss_coef=sec.float("router_aux_loss_coef", positive=False,
                                       default=default_of(MoESpec, "router_aux_loss_coef")),
    )


def _read_layers(text: Section, num_layers: int, *, moe_given: bool
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolve (nope_layers, moe_layers) from either a pattern or an explicit list."""
    sec = text.section("layers", LAYERS_FIELDS, required=True)
    nope = _pattern_or_list(sec, num_layers, "nope_interval", "nope_layers",
                            nope_layers_from_interval)
    if sec.has("moe_interleave_step") or sec.has("moe_layers"):
        moe = _pattern_or_list(sec, num_layers, "moe_interleave_step", "moe_layers",
                               moe_layers_from_step)
    else:  # HF's default step is 1 (every layer MoE); with no moe section, all dense
        moe = moe_layers_from_step(num_layers, 1) if moe_given else ()
    if moe and not moe_given:
        key = "moe_layers" if sec.has("moe_layers") else "moe_interleave_step"
        raise SpecError(f"missing required section: layers {_short(moe)} are MoE "
                        f"(text.layers.{key}), so text.moe must describe the experts",
                        file=text.file, line=sec.line_of(key), field="text.moe")
    return nope, moe


def _pattern_or_list(sec: Section, num_layers: int, pattern_key: str, list_key: str,
                     expand) -> tuple[int, ...]:
    if sec.has(pattern_key) and sec.has(list_key):
        raise sec.error(list_key, f"give either {pattern_key} or {list_key}, not both "
                                  f"({pattern_key} is on line {sec.line_of(pattern_key)})")
    if sec.has(pattern_key):
        return expand(num_layers, sec.int(pattern_key))
    if not sec.has(list_key):
        raise sec.error(pattern_key, f"missing required field (expected {pattern_key} "
                                     f"or an explicit {list_key} list)")
    seen: set[int] = set()
    for index, line in sec.int_list(list_key):
        if index >= num_layers:
            raise sec.error(list_key, f"expected layer indices in [0, {num_layers}), "
                                      f"found {index}", line=line)
        if index in seen:
            raise sec.error(list_key, f"layer {index} is listed twice", line=line)
        seen.add(index)
    return tuple(sorted(seen))


def _short(indices) -> str:
    """`[0, 2, 4, ...]`: enough indices to recognise the pattern."""
    indices = list(indices)
    head = ", ".join(str(i) for i in indices[:4])
    return f"[{head}, ...]" if len(indices) > 4 else f"[{head}]"
