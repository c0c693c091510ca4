"""The pure half of engine building: limits, optimization profiles, precision flags, manifest updates.

Nothing here imports TensorRT, so all of it is tested everywhere. An engine has two
optimization profiles, matching how the runtime calls the model (runtime/engine.py):

- prefill: a prompt of 1..max_seq tokens against an empty cache (past 0);
- decode: one token against a cache of 0..max_seq-1 positions (a chunked layer's cache
  never holds more than chunk-1 positions: runtime/kv_cache.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l4compile.errors import BuildError
from l4compile.runtime.manifest import Manifest

ENGINE_FILE = "model.plan"
VISION_ENGINE_FILE = "vision.plan"   # a vision build's second engine: pixel tiles -> image features
TIMING_CACHE_FILE = "timing.cache"
DEFAULT_MAX_SEQ = 4096
DEFAULT_MAX_TILES = 17               # Llama 4's largest image: 16 tiles and its global thumbnail
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# BuilderFlag members per precision. FP8 kernels come from the model's explicit FP8 Q/DQ nodes;
# the layers around them run in fp16.
PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "fp8": ("FP8", "FP16")}
# A model with explicit Q/DQ of these types needs the matching flag whatever the precision
# (TensorRT 10 builds weakly typed networks by default).
QUANTIZED_FLAGS = ("FP8", "INT8", "INT4", "FP4")
# Flags TensorRT sets by default that a precision turns off: fp32 means fp32 matmuls, not TF32.
CLEARED_FLAGS = {"fp32": ("TF32",)}

Range3 = tuple[int, int, int]                                   # min, opt, max
Shapes3 = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class EngineOptions:
    """What `--precision/--max-batch/--max-seq/--timing-cache` ask for; None: the default or the manifest's."""

    precision: str | None = None
    max_batch: int | None = None
    max_seq: int | None = None
    timing_cache: Path | None = None
    max_tiles: int | None = None     # the vision engine's largest batch of tiles


@dataclass(frozen=True)
class EngineLimits:
    precision: str
    max_batch: int
    max_seq: int
    quantized: tuple[str, ...] = ()    # element types of the model's explicit Q/DQ (from the compat check)

    @property
    def flags(self) -> tuple[str, ...]:
        return builder_flags(self.precision, self.quantized)

    @property
    def cleared_flags(self) -> tuple[str, ...]:
        return CLEARED_FLAGS.get(self.precision, ())


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, Shapes3]     # every input with a symbolic dimension
    values: dict[str, Range3]      # scalar integer inputs, used where TensorRT makes them shape tensors

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
                "values": {k: list(v) for k, v in self.values.items()}}


def builder_flags(precision: str, quantized: tuple[str, ...] = ()) -> tuple[str, ...]:
    """BuilderFlag names for a precision, plus one per quantized type the model's explicit Q/DQ nodes use."""
    if precision not in PRECISION_FLAGS:
        raise BuildError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp8" and "FP8" not in quantized:
        raise BuildError("--precision fp8 needs explicit FP8 Q/DQ nodes in the ONNX and this model has none; "
                         "build it with --quantize fp8")
    flags = PRECISION_FLAGS[precision] + tuple(q for q in QUANTIZED_FLAGS if q in quantized)
    return tuple(dict.fromkeys(flags))


def resolve_limits(manifest: Manifest, options: EngineOptions, quantized: tuple[str, ...] = ()) -> EngineLimits:
    """Command-line values first, then what the build recorded, then defaults; checked against the model.

    The default precision is fp16, or fp8 for a model with FP8 Q/DQ nodes.
    """
    recorded = manifest.trt or {}
    precision = options.precision or recorded.get("precision") or ("fp8" if "FP8" in quantized else "fp16")
    builder_flags(precision, quantized)
    max_batch = options.max_batch or recorded.get("max_batch") or 1
    max_seq = options.max_seq or recorded.get("max_seq") or min(manifest.max_position_embeddings, DEFAULT_MAX_SEQ)
    if max_batch < 1 or max_seq < 1:
        raise BuildError(f"--max-batch and --max-seq must be >= 1, got {max_batch} and {max_seq}")
    if max_seq > manifest.max_position_embeddings:
        raise BuildError(f"--max-seq {max_seq} exceeds the model's maximum context "
                         f"{manifest.max_position_embeddings}")
    return EngineLimits(precision, max_batch, max_seq, tuple(quantized))


def profiles(manifest: Manifest, limits: EngineLimits) -> list[Profile]:
    """Prefill and decode profiles (prefill only for a build without a KV cache).

    Symbolic dimensions come from the manifest's inputs (see l4compile.lower): batch, seq,
    past_chunk (a chunked layer's cached positions) and past (a global layer's).
    """
    b, s = limits.max_batch, limits.max_seq
    chunks = [layer.kv_capacity for layer in manifest.layers if layer.kv_capacity]
    chunk_past = min(min(chunks), s) - 1 if chunks else s - 1
    prefill = {"batch": (1, b, b), "seq": (1, max(1, s // 2), s), "past_chunk": (0, 0, 0), "past": (0, 0, 0),
               "image_tokens": (0, 0, b * s)}   # image features fused at the input (a vision build)
    decode = {"batch": (1, b, b), "seq": (1, 1, 1), "past_chunk": (0, chunk_past // 2, chunk_past),
              "past": (0, (s - 1) // 2, s - 1), "image_tokens": (0, 0, 0)}
    kv = manifest.kv_cache
    result = [_profile("prefill", manifest, prefill, {} if kv is None else {
        kv["past_length"]: (0, 0, 0), kv["logits_start"]: (0, prefill["seq"][1] - 1, s - 1)})]
    if kv is not None:
        result.append(_profile("decode", manifest, decode, {
            kv["past_length"]: (1, decode["past"][1] + 1, s - 1), kv["logits_start"]: (0, 0, 0)}))
    return result


def vision_profile(vision: dict[str, Any], max_tiles: int) -> Profile:
    """The vision engine's one profile: 1..max_tiles tiles of pixels (the runtime encodes more in batches)."""
    c, s = vision["num_channels"], vision["image_size"]
    return Profile("vision", {vision["input"]: ((1, c, s, s), (max_tiles, c, s, s), (max_tiles, c, s, s))}, {})


def vision_limits(vision: dict[str, Any], limits: EngineLimits, options: EngineOptions) -> tuple[str, int]:
    """(precision, max tiles) of the vision engine: the text engine's precision (fp16 where that is fp8: the
    vision model is never quantized, so it has no FP8 Q/DQ), the tile count asked for, recorded, or 17."""
    precision = "fp16" if limits.precision == "fp8" else limits.precision
    max_tiles = options.max_tiles or (vision.get("trt") or {}).get("max_tiles") or DEFAULT_MAX_TILES
    if max_tiles < 1:
        raise BuildError(f"--max-tiles must be >= 1, got {max_tiles}")
    return precision, max_tiles


def _profile(name: str, manifest: Manifest, dims: dict[str, Range3], values: dict[str, Range3]) -> Profile:
    shapes = {}
    for tensor in manifest.inputs:
        if all(isinstance(d, int) for d in tensor.shape):
            continue
        per_dim = []
        for d in tensor.shape:
            if isinstance(d, int):
                per_dim.append((d, d, d))
            elif d in dims:
                per_dim.append(dims[d])
            else:
                raise BuildError(f"input {tensor.name} has dimension {d!r}, which the TensorRT profiles "
                                 f"do not know (known: {', '.join(dims)})")
        shapes[tensor.name] = tuple(tuple(r[k] for r in per_dim) for k in range(3))
    return Profile(name, shapes, values)


def with_engine(manifest: Manifest, limits: EngineLimits, built: list[Profile], tensorrt_version: str) -> Manifest:
    """The manifest of a build whose engine exists: the runtime picks TensorRT."""
    return dataclasses.replace(manifest, backend="tensorrt", files={**manifest.files, "engine": ENGINE_FILE},
                               trt=_section(manifest, limits, "built", None, built, tensorrt_version))


def with_engine_pending(manifest: Manifest, limits: EngineLimits, reason: str) -> Manifest:
    """The manifest of a TensorRT-target build without an engine yet: it still runs on onnxruntime."""
    files = {k: v for k, v in manifest.files.items() if k != "engine"}
    return dataclasses.replace(manifest, backend="onnxruntime", files=files,
                               trt=_section(manifest, limits, "pending", reason, [], None))


def _section(manifest: Manifest, limits: EngineLimits, status: str, reason: str | None,
             built: list[Profile], version: str | None) -> dict[str, Any]:
    return {"engine": ENGINE_FILE if status == "built" else None, "status": status, "reason": reason,
            "precision": limits.precision, "flags": list(limits.flags), "max_batch": limits.max_batch,
            "max_seq": limits.max_seq, "quantized": list(limits.quantized),
            "profiles": [p.to_dict() for p in built], "tensorrt_version": version,
            "compat_report": (manifest.trt or {}).get("compat_report", "compat.json")}
