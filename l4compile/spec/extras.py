"""The optional top-level sections of a spec: special tokens and the vision tower."""

from __future__ import annotations

from dataclasses import fields

from l4compile.spec.model import TokenSpec, VisionSpec
from l4compile.spec.yamlnode import Section, default_of, is_null

TOKEN_FIELDS = ("bos", "eos", "pad", "image")
VISION_FIELDS = tuple(f.name for f in fields(VisionSpec))


def read_tokens(sec: Section | None, vocab_size: int) -> TokenSpec:
    """Token ids, each checked against the vocabulary; `eos` is one id or a list."""
    if sec is None:
        return TokenSpec()
    single = {key: _token(sec, key, vocab_size) for key in ("bos", "pad", "image")}
    return TokenSpec(eos=_eos_tokens(sec, vocab_size), **single)


def _token(sec: Section, key: str, vocab_size: int) -> int | None:
    token = sec.int(key, default=None, minimum=0, nullable=True)
    if token is not None and token >= vocab_size:
        raise sec.error(key, f"expected a token id in [0, {vocab_size}) (vocab_size), "
                             f"found {token}")
    return token


def _eos_tokens(sec: Section, vocab_size: int) -> tuple[int, ...]:
    node = sec.node("eos")
    if node is None or is_null(node):
        return ()
    tokens = sec.int_list("eos", allow_scalar=True)
    for token, line in tokens:
        if token >= vocab_size:
            raise sec.error("eos", f"expected token ids in [0, {vocab_size}) (vocab_size), "
                                   f"found {token}", line=line)
    return tuple(token for token, _ in tokens)


def read_vision(sec: Section | None) -> VisionSpec | None:
    """Every VisionSpec field, with model.py's defaults; checks that the tower's
    shapes chain the way transformers' Llama4VisionModel needs them to."""
    if sec is None:
        return None
    values = {}
    for f in fields(VisionSpec):
        default = default_of(VisionSpec, f.name)
        if f.type in ("int", int):
            values[f.name] = sec.int(f.name, default=default)
        else:
            values[f.name] = sec.float(f.name, default=default)
    vision = VisionSpec(**values)
    _check_vision(sec, vision)
    return vision


# What the vision tower really uses: transformers builds every vision LayerNorm as nn.LayerNorm(hidden_size)
# (eps 1e-5) whatever the config's norm_eps says, and so does l4compile.lower_vision.
VISION_LAYER_NORM_EPS = 1e-5


def _check_vision(sec: Section, v: VisionSpec) -> None:
    if v.norm_eps != VISION_LAYER_NORM_EPS:
        raise sec.error("norm_eps", f"expected {VISION_LAYER_NORM_EPS:g}, the eps every LayerNorm of Llama 4's "
                                    f"vision tower uses (transformers' nn.LayerNorm default, whatever the "
                                    f"config says), found {v.norm_eps:g}")
    if v.image_size % v.patch_size:
        raise sec.error("patch_size", f"expected a divisor of image_size {v.image_size}, "
                                      f"found {v.patch_size}")
    if v.hidden_size % v.num_heads:
        raise sec.error("num_heads", f"expected a divisor of hidden_size {v.hidden_size}, "
                                     f"found {v.num_heads}")
    if v.pixel_shuffle_ratio > 1:
        raise sec.error("pixel_shuffle_ratio", f"expected a ratio in (0, 1], "
                                               f"found {v.pixel_shuffle_ratio}")
    side = v.image_size // v.patch_size
    if not _whole(side * v.pixel_shuffle_ratio):
        raise sec.error("pixel_shuffle_ratio", f"the {side}x{side} patch grid cannot be "
                                               f"shuffled by {v.pixel_shuffle_ratio}")
    shuffled = v.hidden_size / v.pixel_shuffle_ratio ** 2
    if shuffled != v.intermediate_size:
        # transformers' adapter fc1 is Linear(intermediate_size, projector_input_dim) and is
        # fed the pixel-shuffled patches.
        raise sec.error("intermediate_size", f"expected hidden_size / pixel_shuffle_ratio**2 = "
                                             f"{shuffled:g} (the vision adapter's input), "
                                             f"found {v.intermediate_size}")
    if v.projector_input_dim != v.projector_output_dim:
        # the adapter's fc2 is Linear(projector_output_dim, projector_output_dim) after fc1
        raise sec.error("projector_output_dim", f"expected projector_input_dim "
                                                f"{v.projector_input_dim}, found "
                                                f"{v.projector_output_dim}")
    if v.vision_output_dim != v.projector_output_dim:
        raise sec.error("vision_output_dim", f"expected projector_output_dim "
                                             f"{v.projector_output_dim} (the adapter's output), "
                                             f"found {v.vision_output_dim}")


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-9
