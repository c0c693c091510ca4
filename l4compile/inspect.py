"""`l4compile inspect`: what a spec costs, by arithmetic on the spec alone.

Parameters (total, active per text token, by part and per layer), FLOPs per token,
weight bytes per dtype and KV-cache size, naive versus chunked. No weights and no
torch: it runs in milliseconds on the full-size specs.
"""

from __future__ import annotations

import math
import re

from l4compile.quant import WEIGHT_BLOCK_SIZE
from l4compile.lower_vision import has_image_input
from l4compile.spec.model import ModelSpec
from l4compile.spec.params import (active_matmul_params, active_params, layer_params, vision_params,
                                   params_breakdown)

DTYPES = ("float32", "bfloat16", "float16", "fp8", "int4")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float8": "fp8"}
INT4_BLOCK = WEIGHT_BLOCK_SIZE  # int4 weights carry one float16 scale per block (of 64: `build --block-size`)
_BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def canonical_dtype(dtype: str) -> str:
    """One of DTYPES (accepts fp32, bf16, fp16, float8); ValueError otherwise."""
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return name


def storage_bytes(elements: int, dtype: str, block: int = INT4_BLOCK) -> int:
    """Bytes to store `elements` values; int4 packs two per byte plus the block scales, int8 (a
    quantized build's blocks, not a weight dtype of its own) one per byte plus the block scales."""
    if dtype == "int8":
        return elements + 2 * math.ceil(elements / block)
    dtype = canonical_dtype(dtype)
    if dtype == "int4":
        return math.ceil(elements / 2) + 2 * math.ceil(elements / block)
    return elements * _BYTES_PER_ELEMENT[dtype]


def parse_size(text: str) -> int:
    """'80GB' -> 80 * 10**9, '80GiB' -> 80 * 2**30, '1e9' -> 10**9; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 80GB or 80GiB, found {text!r}")
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if not value < 2**63:   # also inf, from an exponent like 1e999
        raise ValueError(f"expected a size below 2**63 bytes, found {text!r}")
    return int(value)


def build_report(spec: ModelSpec, context: int | None = None, dtype: str = "bfloat16",
                 budget_bytes: int | None = None) -> dict:
    """The inspect report as plain data (what `inspect --json` prints).

    - `flops_per_token`: 2 per active matmul parameter (lm_head and router included,
      embedding lookup and norms not), plus, with `context`, the attention products of
      one token over its cached keys: 4 * num_heads * head_dim per key and layer, where a
      global layer sees `context` keys and a chunked layer min(context, chunk_size).
    - `weight_bytes`: all parameters (vision included) per dtype; int4 adds one float16
      scale per block of WEIGHT_BLOCK_SIZE (64) values.
    - `kv_cache` (in `dtype`): per token when every layer keeps every position, and with
      `context` the naive size against the chunked one (chunked layers keep
      min(context, chunk_size) positions, global layers `context`).
    - `fits` (with `budget_bytes`): per weight dtype, whether its weights plus the chunked
      KV cache at `context` (none without a context) fit in the budget.
    - `quantized_build_bytes`: the text model's weights as `build --quantize fp8|int8|int4` stores
      them: matmul weights (attention, FFNs, experts, lm_head) quantized, the router, norms and the
      vision model (a build has one where the spec has a vision tower and an image token) in bfloat16,
      the embeddings in bfloat16 (fp8) or quantized (int8 / int4 defaults: int4 holds the embedding table in
      8-bit blocks of 64, `l4compile.quant.TABLE_BITS`); with a budget, `fits_quantized_build` says whether each fits with the KV cache.
    - `vision` (a spec with a vision tower, else None): its parameters, image features per tile and
      FLOPs per tile (2 per matmul parameter and token through it, plus the attention products).

    ValueError for an unknown dtype, a context < 1 or a negative budget.
    """
    dtype = canonical_dtype(dtype)
    if context is not None and context < 1:
        raise ValueError(f"context must be a positive number of tokens, found {context}")
    if budget_bytes is not None and budget_bytes < 0:
        raise ValueError(f"budget must be a non-negative number of bytes, found {budget_bytes}")
    breakdown = params_breakdown(spec)
    report: dict = {
        "name": spec.name,
        "description": spec.description,
        "estimate": spec.estimate,
        "params_total": sum(breakdown.values()),
        "params_active": active_params(spec),
        "params_breakdown": breakdown,
        "layers": _layer_rows(spec),
        "context": context,
        "flops_per_token": _flops_per_token(spec, context),
        "flops_per_token_parts": {"matmul": 2 * active_matmul_params(spec),
                                  "attention": _attention_flops(spec, context)},
        "weight_bytes": {d: storage_bytes(sum(breakdown.values()), d) for d in DTYPES},
        "quantized_build_bytes": {d: _quantized_build_bytes(breakdown, d, has_image_input(spec),
                                                            spec.tie_word_embeddings) for d in QUANTIZED_BUILDS},
        "vision": _vision_report(spec),
        "kv_cache": _kv_cache(spec, context, dtype),
    }
    if budget_bytes is not None:
        kv = report["kv_cache"].get("bytes_chunked", 0)
        report["budget_bytes"] = budget_bytes
        report["fits"] = {d: weights + kv <= budget_bytes
                          for d, weights in report["weight_bytes"].items()}
        report["fits_quantized_build"] = {d: weights + kv <= budget_bytes
                                          for d, weights in report["quantized_build_bytes"].items()}
    return report


QUANTIZED_BUILDS = ("fp8", "int8", "int4")
QUANTIZED_PARTS = ("lm_head", "attention", "dense_ffn", "moe_routed", "moe_shared")   # what --quantize stores quantized
HIGH_PRECISION_PARTS = ("embedding", "router", "norms")                              # kept in bfloat16


def _quantized_build_bytes(breakdown: dict[str, int], dtype: str, vision: bool, tied: bool = False) -> int:
    """int8 and int4 builds quantize the embedding table and lm_head too by default, each at its default bits
    and block (`l4compile.quant.TABLE_BITS`: int4 holds the table in 8-bit blocks; a tied table, the lm_head's),
    as llama.cpp's files do; fp8 builds keep the table in bfloat16."""
    from l4compile.quant import TABLE_BITS, TABLE_BLOCK_SIZE, WEIGHT_BLOCK_SIZE
    extra = breakdown["vision"] if vision else 0
    if dtype == "fp8":
        quantized = sum(breakdown[part] for part in QUANTIZED_PARTS)
        return storage_bytes(quantized, dtype) + storage_bytes(sum(breakdown[p] for p in HIGH_PRECISION_PARTS) + extra,
                               "bfloat16")
    matmuls = sum(breakdown[part] for part in QUANTIZED_PARTS if part != "lm_head")
    total = storage_bytes(matmuls, dtype, WEIGHT_BLOCK_SIZE)
    for part in ("embedding", "lm_head"):
        table = "lm_head" if tied else part
        bits = TABLE_BITS[dtype][table]
        total += storage_bytes(breakdown[part], f"int{bits}", TABLE_BLOCK_SIZE[dtype][table][bits])
    high = sum(breakdown[p] for p in HIGH_PRECISION_PARTS if p != "embedding")
    return total + storage_bytes(high + extra, "bfloat16")


def _vision_report(spec: ModelSpec) -> dict | None:
    """Vision tower parameters and FLOPs per tile (one image tile through the tower and the projector)."""
    v = spec.vision
    if v is None:
        return None
    side = v.image_size // v.patch_size
    patches, tokens = side * side, round(side * v.pixel_shuffle_ratio) ** 2
    n, h = patches + 1, v.hidden_size                 # the encoder sees the patches and the class token
    matmul = 2 * (patches * v.num_channels * v.patch_size ** 2 * h
                  + v.num_layers * n * (4 * h * h + 2 * h * v.intermediate_size)
                  + tokens * (v.intermediate_size * v.projector_input_dim + v.projector_output_dim ** 2
                              + v.vision_output_dim * spec.hidden_size))
    attention = v.num_layers * 4 * n * n * h          # q k^T and weights @ v, all heads
    return {"params": vision_params(v, spec.hidden_size), "in_build": has_image_input(spec), "tokens_per_tile": tokens,
            "flops_per_tile": matmul + attention, "flops_per_tile_parts": {"matmul": matmul, "attention": attention}}


def _layer_rows(spec: ModelSpec) -> list[dict]:
    return [{"index": layer.index, "attention": layer.attention, "rope": layer.rope,
             "qk_norm": layer.qk_norm, "temperature_tuning": layer.temperature_tuning,
             "ffn": layer.ffn, "params": layer_params(spec, layer).total}
            for layer in spec.layers]


def _kv_positions(spec: ModelSpec, context: int) -> int:
    """Cached positions summed over layers when chunked layers keep only their chunk."""
    chunk = spec.attention.chunk_size
    return sum(min(context, chunk) if layer.attention == "chunked" else context
               for layer in spec.layers)


def _attention_flops(spec: ModelSpec, context: int | None) -> int:
    """Score and value products of one token attending `context` cached tokens:
    4 * num_heads * head_dim per key and layer; a chunked layer sees at most its chunk."""
    if context is None:
        return 0
    a = spec.attention
    return 4 * a.num_heads * a.head_dim * _kv_positions(spec, context)


def _flops_per_token(spec: ModelSpec, context: int | None) -> int:
    """2 FLOPs per active matmul parameter, plus attention at `context` if given."""
    return 2 * active_matmul_params(spec) + _attention_flops(spec, context)


def _kv_cache(spec: ModelSpec, context: int | None, dtype: str) -> dict:
    per_position = 2 * spec.attention.num_kv_heads * spec.attention.head_dim  # K and V
    out: dict = {"dtype": dtype,
                 "bytes_per_token_naive": storage_bytes(per_position * spec.num_layers, dtype)}
    if context is not None:
        naive = storage_bytes(per_position * spec.num_layers * context, dtype)
        chunked = storage_bytes(per_position * _kv_positions(spec, context), dtype)
        out.update(context=context, bytes_naive=naive, bytes_chunked=chunked,
                   ratio=chunked / naive)
    return out


# -- human-readable table ------------------------------------------------------------

def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(report: dict) -> str:
    """A readable summary of `build_report`'s output."""
    sections = [_format_header(report), _format_params(report), _format_layers(report),
                _format_compute(report), _format_memory(report)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _format_header(report: dict) -> str:
    lines = [f"{report['name']}: {report['description']}".rstrip(": ")]
    if report["estimate"]:
        lines.append("NOTE: the shapes of this spec are an estimate, not published.")
    return "\n".join(lines)


def _format_params(report: dict) -> str:
    lines = ["parameters",
             f"  {'total':<14}{format_count(report['params_total']):>12}",
             f"  {'active/token':<14}{format_count(report['params_active']):>12}"]
    for part, count in report["params_breakdown"].items():
        if count:
            lines.append(f"    {part:<12}{format_count(count):>12}")
    return "\n".join(lines)


def _format_layers(report: dict) -> str:
    header = f"  {'layer':>5}  {'attention':<9}  {'rope':<4}  {'qk_norm':<7}  " \
             f"{'temp':<4}  {'ffn':<5}  {'params':>10}"
    lines = ["layers", header]
    yes = {True: "yes", False: "no"}
    for row in report["layers"]:
        lines.append(f"  {row['index']:>5}  {row['attention']:<9}  {yes[row['rope']]:<4}  "
                     f"{yes[row['qk_norm']]:<7}  {yes[row['temperature_tuning']]:<4}  "
                     f"{row['ffn']:<5}  {format_count(row['params']):>10}")
    return "\n".join(lines)


def _format_compute(report: dict) -> str:
    at = f" at context {report['context']:,}" if report["context"] else ""
    parts = report["flops_per_token_parts"]
    line = f"FLOPs/token{at}: {_gflop(report['flops_per_token'])} " \
           f"(matmul {_gflop(parts['matmul'])}"
    if report["context"]:
        line += f", attention {_gflop(parts['attention'])}"
    line += ")"
    vision = report.get("vision")
    if vision:
        line += (f"\nvision: {format_count(vision['params'])} parameters, {vision['tokens_per_tile']} image features "
                 f"and {_gflop(vision['flops_per_tile'])} per tile (attention "
                 f"{_gflop(vision['flops_per_tile_parts']['attention'])})")
    return line


def _gflop(flops: int) -> str:
    return f"{flops / 1e9:,.1f} GFLOP"


def _budget_verdict(report: dict) -> str:
    """One line: the smallest storage that fits the budget, with its headroom."""
    kv = report["kv_cache"].get("bytes_chunked", 0)
    options = [(size, f"{dtype} ({format_bytes(size)})") for dtype, size in report["weight_bytes"].items()]
    options += [(size, f"build --quantize {dtype} ({format_bytes(size)})")
                for dtype, size in report["quantized_build_bytes"].items()]
    fitting = [(size, label) for size, label in options if size + kv <= report["budget_bytes"]]
    kv_text = f" + KV cache {format_bytes(kv)}" if kv else ""
    if not fitting:
        return f"  verdict: {report['name']} does not fit {format_bytes(report['budget_bytes'])} at any dtype"
    size, label = max(fitting)   # the most precise storage that still fits
    return (f"  verdict: {report['name']} fits {format_bytes(report['budget_bytes'])} at {label}{kv_text}, "
            f"{format_bytes(report['budget_bytes'] - size - kv)} to spare")


def _format_memory(report: dict) -> str:
    kv = report["kv_cache"]
    lines = ["weights"]
    for dtype, size in report["weight_bytes"].items():
        fits = ""
        if "fits" in report:
            fits = "  fits" if report["fits"][dtype] else "  does not fit"
        lines.append(f"  {dtype:<10}{format_bytes(size):>12}{fits}")
    for dtype, size in report["quantized_build_bytes"].items():
        fits = ""
        if "fits_quantized_build" in report:
            fits = "  fits" if report["fits_quantized_build"][dtype] else "  does not fit"
        vision = ", vision" if (report.get("vision") or {}).get("in_build") else ""
        kept = "norms, embeddings" if dtype == "fp8" else "norms"
        lines.append(f"  {dtype + ' build':<10}{format_bytes(size):>12}{fits}   (build --quantize {dtype}: router, "
                     f"{kept}{vision} bfloat16)")
    if "fits" in report:
        lines.append(f"  (budget {format_bytes(report['budget_bytes'])}, weights + chunked "
                     "KV cache at the context)")
        lines.append(_budget_verdict(report))
    lines.append(f"KV cache ({kv['dtype']}): {format_bytes(kv['bytes_per_token_naive'])} "
                 "per token, every layer keeping every position")
    if "context" in kv:
        lines.append(f"  at context {kv['context']:,}: naive {format_bytes(kv['bytes_naive'])}, "
                     f"chunked {format_bytes(kv['bytes_chunked'])} "
                     f"({kv['ratio']:.1%} of naive)")
    return "\n".join(lines)
