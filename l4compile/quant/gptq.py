"""GPTQ for the INT4 blocks of MatMulNBits: round-to-nearest, with each column's rounding error
compensated on the columns not yet quantized (Frantar et al., "GPTQ", 2022, Algorithm 1).

The Hessian H = X^T X of a weight's calibration inputs X (from the fp32 torch reference,
`l4compile.quant.calibrate.Calibration.hessians`) says which output errors the rounding causes.
Columns (input features) are quantized in order; each block's scale is set as `int4_blocks` sets
it, from the block's error-updated weights when the block starts. Codes and scales have
`int4_blocks`' layout: the ONNX side is unchanged, only the choice of codes differs.
"""

from __future__ import annotations

import numpy as np

from l4compile.quant.schemes import INT4_ZERO_POINT, pack_int4

DAMPING = 0.01   # of the mean of H's diagonal, added to it: GPTQ's default
# Each block's scale: the Q4_0 scale (largest magnitude -> -8) shrunk by the factor of this grid
# whose rounding error is least, as GPTQ's quantizer does with `mse=True` (error norm 2.4).
SHRINK_GRID = np.linspace(1.0, 0.8, 9, dtype=np.float32)
ERROR_NORM = 2.4


def block_scale(block: np.ndarray) -> np.ndarray:
    """[..., N, block_size] -> [..., N]: the scale of least rounding error among the shrunk Q4_0 scales."""
    high, low = block.max(axis=-1), block.min(axis=-1)
    base = np.where(high >= -low, high, low) / -INT4_ZERO_POINT
    safe = np.where(base == 0, 1.0, base)
    best, best_error = base, np.full(base.shape, np.inf, dtype=np.float32)
    for shrink in SHRINK_GRID:
        scale = safe * shrink
        error = np.sum(np.abs(np.clip(np.rint(block / scale[..., None]), -8, 7) * scale[..., None] - block)
                       ** ERROR_NORM, axis=-1)
        better = error < best_error
        best, best_error = np.where(better, base * shrink, best), np.where(better, error, best_error)
    return best.astype(np.float32)


def _inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of (H + damping)^-1, batched over leading axes (float64)."""
    h = hessian.astype(np.float64)
    diag = np.einsum("...ii->...i", h)                                   # a writable view
    diag[...] = np.where(diag > 0, diag, 1.0)                            # inputs never seen: plain rounding
    diag += DAMPING * diag.mean(axis=-1, keepdims=True)
    inverse = np.linalg.inv(h)
    return np.swapaxes(np.linalg.cholesky((inverse + np.swapaxes(inverse, -1, -2)) / 2), -1, -2)


def gptq_values(rows: np.ndarray, hessian: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """rows [..., N, K] (K: input features, a multiple of `block_size`), hessian [..., K, K] ->
    (integer values in [-8, 7] [..., N, K / block_size, block_size], scales [..., N, K / block_size])."""
    w = rows.astype(np.float32, copy=True)
    u = _inverse_cholesky(hessian).astype(np.float32)                    # [..., K, K], upper
    k = w.shape[-1]
    values = np.empty_like(w)
    scales = np.empty(w.shape[:-1] + (k // block_size,), dtype=np.float32)
    for start in range(0, k, block_size):
        end = start + block_size
        block = w[..., start:end]                                         # a view: updated in place
        scale = block_scale(block)                                        # [..., N]
        scales[..., start // block_size] = scale
        safe = np.where(scale == 0, 1.0, scale)
        errors = np.empty_like(block)
        for j in range(block_size):
            column = block[..., j]
            value = np.clip(np.rint(column / safe), -8, 7)
            values[..., start + j] = value
            errors[..., j] = (column - value * scale) / u[..., start + j, start + j][..., None]
            block[..., j:] -= errors[..., j, None] * u[..., None, start + j, start + j:end]
        w[..., end:] -= errors @ u[..., start:end, end:]
    return values.reshape(w.shape[:-1] + (k // block_size, block_size)), scales


def gptq_int4_blocks(w: np.ndarray, axis: int, block_size: int, hessian: np.ndarray) -> dict[str, np.ndarray]:
    """`int4_blocks` with GPTQ's choice of codes. `hessian` is [K, K] for a 2-D weight, [E, K, K] for
    stacked experts [E, ...]; an expert whose Hessian is all zero (no calibration token) is rounded
    to nearest (an identity Hessian propagates no error)."""
    rows = np.moveaxis(w, axis, -1)                                       # [..., N, K]
    k = rows.shape[-1]
    padded_k = -(-k // block_size) * block_size
    h = np.zeros(hessian.shape[:-2] + (padded_k, padded_k), dtype=np.float32)
    h[..., :k, :k] = hessian
    unseen = ~np.any(hessian.reshape(hessian.shape[:-2] + (-1,)) != 0, axis=-1)
    h[unseen] = np.eye(padded_k, dtype=np.float32)
    if padded_k != k:   # padding columns are 0 and see no error: identity there
        h[..., range(k, padded_k), range(k, padded_k)] = 1.0
        rows = np.concatenate([rows, np.zeros(rows.shape[:-1] + (padded_k - k,), rows.dtype)], axis=-1)
    values, scales = gptq_values(rows, h, block_size)
    return pack_int4(values, scales)
