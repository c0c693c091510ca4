"""Weight quantizers in numpy: one float tensor in, its stored parts (codes and scales) out.

They run inside the weight stream (`l4compile.weights.derived`), one tensor at a time, so a
quantized build never holds more than one source tensor and its codes. Scales keep the
tensor's rank (size 1 along the reduced axis); the caller reshapes them to the parameter.
"""

from __future__ import annotations

import numpy as np

FP8_MAX = 448.0      # largest finite float8e4m3fn
INT8_MAX = 127.0
INT4_ZERO_POINT = 8  # MatMulNBits' default zero point for 4 bits: stored code = value + 8
INT8_ZERO_POINT = 128  # and for 8 bits (QMoE's too): stored code = value + 128


def _absmax_scale(w: np.ndarray, axis: int, qmax: float) -> np.ndarray:
    absmax = np.abs(w).max(axis=axis, keepdims=True)
    return np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)


def _scaled(w: np.ndarray, scale: np.ndarray, qmax: float, round_to_int: bool) -> np.ndarray:
    """w / scale clipped to [-qmax, qmax], in one float32 temporary (peak: the tensor plus one copy)."""
    out = np.divide(w, scale, dtype=np.float32)
    if round_to_int:
        np.rint(out, out=out)
    return np.clip(out, -qmax, qmax, out=out)


def fp8_per_channel(w: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """float8e4m3fn codes with one scale per output channel: scale = absmax over `axis` / 448."""
    import ml_dtypes
    scale = _absmax_scale(w, axis, FP8_MAX)
    # ml_dtypes turns out-of-range values into NaN rather than saturating: clip first.
    return {"q": _scaled(w, scale, FP8_MAX, False).astype(ml_dtypes.float8_e4m3fn), "scale": scale}


def int8_per_channel(w: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """Symmetric int8 codes with one scale per channel (embedding rows): scale = absmax over `axis` / 127."""
    scale = _absmax_scale(w, axis, INT8_MAX)
    return {"q": _scaled(w, scale, INT8_MAX, True).astype(np.int8), "scale": scale}


def _blocks(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """w [..., K, ...] with K at `axis` -> float32 [..., N, k_blocks, block_size], zero-padded at the end of K:
    the one float copy a block quantizer makes (it then works in place)."""
    rows = np.moveaxis(w, axis, -1)                                      # [..., N, K] (a view)
    k = rows.shape[-1]
    blocks_per_row = -(-k // block_size)
    padded = np.zeros(rows.shape[:-1] + (blocks_per_row * block_size,), dtype=np.float32)
    padded[..., :k] = rows
    return padded.reshape(rows.shape[:-1] + (blocks_per_row, block_size))


def int4_blocks(w: np.ndarray, axis: int, block_size: int) -> dict[str, np.ndarray]:
    """4-bit codes in MatMulNBits' layout, blocks of `block_size` along the input-feature `axis`.

    w [..., K, ...] with K at `axis` -> q uint8 [..., N, k_blocks, block_size / 2] (two codes a byte,
    low nibble first) and scale [..., N, k_blocks]. Symmetric with zero point 8: the value of
    largest magnitude in a block maps to code 0 (-8 * scale), as llama.cpp's Q4_0 and onnxruntime's
    4-bit quantizer do, so a block uses all 16 levels.
    """
    blocks = _blocks(w, axis, block_size)
    high, low = blocks.max(axis=-1, keepdims=True), blocks.min(axis=-1, keepdims=True)
    extreme = np.where(high >= -low, high, low)                          # the value of largest magnitude
    scale = (extreme / -INT4_ZERO_POINT).astype(np.float32)              # [..., N, k_blocks, 1]
    np.divide(blocks, np.where(scale == 0, 1.0, scale), out=blocks)
    np.clip(np.rint(blocks, out=blocks), -8, 7, out=blocks)
    return pack_int4(blocks, scale[..., 0])


def int8_blocks(w: np.ndarray, axis: int, block_size: int) -> dict[str, np.ndarray]:
    """8-bit codes in MatMulNBits' layout (bits=8), blocks of `block_size` along the input-feature `axis`.

    w [..., K, ...] -> q uint8 [..., N, k_blocks, block_size] (code = value + 128) and scale
    [..., N, k_blocks]. Symmetric, scale = absmax of the block / 127, as llama.cpp's Q8_0.
    """
    blocks = _blocks(w, axis, block_size)
    scale = _absmax_scale(blocks, -1, INT8_MAX)                          # [..., N, k_blocks, 1]
    np.divide(blocks, scale, out=blocks)
    np.clip(np.rint(blocks, out=blocks), -INT8_MAX, INT8_MAX, out=blocks)
    blocks += INT8_ZERO_POINT
    return {"q": blocks.astype(np.uint8), "scale": scale[..., 0]}


def pack_int4(values: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """Integer values in [-8, 7], [..., N, k_blocks, block_size] -> MatMulNBits' packed codes
    [..., N, k_blocks, block_size / 2] (code = value + 8, low nibble first) and scale [..., N, k_blocks].
    `values` (float) is overwritten, so that the codes take no second float copy."""
    values += INT4_ZERO_POINT
    codes = values.astype(np.uint8)
    return {"q": codes[..., 0::2] | (codes[..., 1::2] << 4), "scale": scale.astype(np.float32)}


def _gptq_int4_blocks(w: np.ndarray, axis: int, block_size: int, hessian: np.ndarray) -> dict[str, np.ndarray]:
    from l4compile.quant.gptq import gptq_int4_blocks
    return gptq_int4_blocks(w, axis, block_size, hessian)


SCHEMES = {"fp8": fp8_per_channel, "int8": int8_per_channel, "int8_blocks": int8_blocks, "int4": int4_blocks, "int4_gptq": _gptq_int4_blocks}
