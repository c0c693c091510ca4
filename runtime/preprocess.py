"""Image preprocessing and prompt expansion of Llama 4 (transformers' Llama4ImageProcessor and Llama4Processor),
in numpy: data in, arrays out, no model in sight. Pillow is needed only to read files or PIL images
(`pip install 'l4compile[vision]'`).

An image of H x W pixels is fitted to the best canvas of `tile`-pixel tiles (at most `max_tiles`), resized
without distortion (never upscaled beyond one tile), padded right and bottom, rescaled to [0, 1], normalized
with mean and std 0.5 (in bfloat16 steps, as the reference does), and cut into tiles row by row; an image of
more than one tile adds a global thumbnail (the whole image resized to one tile) last. Its prompt is
`<|image_start|>`, for several tiles each row's tiles of `<|patch|>` tokens joined by `<|tile_x_separator|>`
and ended by `<|tile_y_separator|>`, then `<|image|>` and the thumbnail's patches, then `<|image_end|>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from l4compile.runtime.errors import RuntimeInputError

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE = 1 / 255


@dataclass(frozen=True)
class ImageTokens:
    """The special token ids of an image's prompt; `patch` is the one image features replace (image_token_index)
    and `image` is also the placeholder that `expand_prompt` replaces by each image's tokens."""

    image_start: int
    image_end: int
    tile_x: int
    tile_y: int
    image: int
    patch: int


# Llama 4's tokenizer (Meta's llama-models: <|image_start|> 200080 ... <|patch|> 200092)
LLAMA4_IMAGE_TOKENS = ImageTokens(image_start=200080, image_end=200081, tile_x=200084, tile_y=200085, image=200090,
                                  patch=200092)


# ---- tiling: which canvas of tiles an image gets --------------------------------------------------------
def supported_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows * cols <= max_tiles, in the reference's order (find_supported_resolutions:
    tile counts from max_tiles down, grouped by aspect ratio in order of first appearance)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_fit_grid(height: int, width: int, tile: int, max_tiles: int,
                  resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The grid of the canvas the image fits with the least upscaling (or, if it must shrink, the least
    downscaling); ties go to the smallest canvas (get_best_fit, its float32 arithmetic included)."""
    grids = supported_grids(max_tiles)
    rows = np.array([g[0] for g in grids], np.float32) * tile
    cols = np.array([g[1] for g in grids], np.float32) * tile
    scale_h, scale_w = rows / np.float32(height), cols / np.float32(width)
    scales = np.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = (up.max() if resize_to_max_canvas else up.min()) if up.size else scales[scales < 1].max()
    candidates = [i for i in range(len(grids)) if scales[i] == chosen]
    best = min(candidates, key=lambda i: grids[i][0] * grids[i][1])   # first of the smallest area, like argmin
    return grids[best]


def resized_size(height: int, width: int, grid: tuple[int, int], tile: int,
                 resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The size the image is resized to before padding to its canvas: the largest without distortion inside the
    canvas, and no larger than the image itself unless it is smaller than a tile (get_max_res_without_distortion)."""
    canvas_h, canvas_w = grid[0] * tile, grid[1] * tile
    if not resize_to_max_canvas:
        canvas_h, canvas_w = min(max(height, tile), canvas_h), min(max(width, tile), canvas_w)
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), canvas_h), canvas_w
    else:
        new_h, new_w = canvas_h, min(math.floor(width * scale_h), canvas_w)
    return max(new_h, 1), max(new_w, 1)


# ---- pixels -------------------------------------------------------------------------------------------------
def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased bilinear (triangle filter, widened by the scale when shrinking; PIL and torchvision antialias=True
    style): for each output index, the input indices [out, K] it reads and their weights [out, K] (summing to 1)."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = lo[:, None] + np.arange(int((hi - lo).max()))[None]
    weights = np.clip(1.0 - np.abs((taps - centers[:, None] + 0.5) / support), 0.0, None) * (taps < hi[:, None])
    weights /= weights.sum(1, keepdims=True)
    return np.minimum(taps, in_size - 1), weights.astype(np.float32)


def _resize_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    taps, weights = _resize_taps(image.shape[axis], out_size)
    shape = [1] * image.ndim
    shape[axis] = out_size
    out = np.zeros(image.shape[:axis] + (out_size,) + image.shape[axis + 1:], np.float32)
    for k in range(taps.shape[1]):
        out += np.take(image, taps[:, k], axis=axis) * weights[:, k].reshape(shape)
    return out


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """image [C, H, W] -> [C, height, width], antialiased bilinear; a uint8 image stays uint8 (rounded)."""
    out = _resize_axis(_resize_axis(image.astype(np.float32), 2, width), 1, height)
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def _bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 precision (round to nearest even), kept as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD) -> np.ndarray:
    """[C, H, W] in 0..255 -> ((x / 255) - mean) / std, each step rounded to bfloat16 as the reference computes it."""
    x = _bfloat16(_bfloat16(image.astype(np.float32)) * np.float32(RESCALE))
    m = _bfloat16(np.asarray(mean, np.float32))[:, None, None]
    s = _bfloat16(np.asarray(std, np.float32))[:, None, None]
    return _bfloat16(_bfloat16(x - m) / s)


def split_tiles(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[C, rows*t, cols*t] -> [rows*cols, C, t, t], tiles row by row (split_to_tiles)."""
    c, h, w = image.shape
    rows, cols = grid
    tiles = image.reshape(c, rows, h // rows, cols, w // cols).transpose(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, c, h // rows, w // cols)


def as_channels_first(image: Any, channels: int = 3) -> np.ndarray:
    """An image as [C, H, W]: a PIL image or a file path (Pillow), or an array [H, W, C] / [C, H, W] / [H, W]."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") or hasattr(image, "convert"):
        image = load_image(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[None], channels, axis=0)
    elif array.ndim == 3 and array.shape[-1] == channels and array.shape[0] != channels:
        array = array.transpose(2, 0, 1)
    if array.ndim != 3 or array.shape[0] != channels or min(array.shape[1:]) == 0:
        raise RuntimeInputError(f"an image must be [H, W, {channels}] or [{channels}, H, W] (or a file or PIL "
                                f"image), got shape {array.shape}")
    if array.dtype.kind not in "uif":
        raise RuntimeInputError(f"image values must be numbers in 0..255, got dtype {array.dtype}")
    return array


def load_image(image: Any) -> np.ndarray:
    """A file path or PIL image -> uint8 [H, W, 3] RGB (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeInputError("reading image files needs Pillow: pip install 'l4compile[vision]'") from None
    if not hasattr(image, "convert"):
        try:
            image = Image.open(image)
        except (OSError, ValueError) as exc:
            raise RuntimeInputError(f"cannot read image {image}: {exc}") from None
    return np.asarray(image.convert("RGB"))


def preprocess_image(image: Any, tile: int = 336, max_tiles: int = 16, channels: int = 3,
                     resize_to_max_canvas: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (pixel_values float32 [tiles, C, tile, tile], grid (rows, cols)); tiles = rows * cols, plus the
    global thumbnail when rows * cols > 1."""
    pixels = as_channels_first(image, channels)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float32)
    _, height, width = pixels.shape
    grid = best_fit_grid(height, width, tile, max_tiles, resize_to_max_canvas)
    new_h, new_w = resized_size(height, width, grid, tile, resize_to_max_canvas)
    canvas = np.zeros((channels, grid[0] * tile, grid[1] * tile), np.float32)
    canvas[:, :new_h, :new_w] = resize(pixels, new_h, new_w)
    tiles = split_tiles(normalize(canvas), grid)
    if grid[0] * grid[1] > 1:
        thumbnail = normalize(resize(pixels, tile, tile).astype(np.float32))
        tiles = np.concatenate([tiles, thumbnail[None]])
    return tiles.astype(np.float32), grid


# ---- prompt ---------------------------------------------------------------------------------------------------
def image_prompt(grid: tuple[int, int], tokens_per_tile: int, tokens: ImageTokens) -> list[int]:
    """The token ids that stand for one image in the prompt (Llama4Processor._prompt_split_image)."""
    rows, cols = grid
    out = [tokens.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += [tokens.patch] * tokens_per_tile
                if x < cols - 1:
                    out.append(tokens.tile_x)
            out.append(tokens.tile_y)
    out += [tokens.image] + [tokens.patch] * tokens_per_tile + [tokens.image_end]
    return out


def expand_prompt(ids: Sequence[int], grids: Sequence[tuple[int, int]], tokens_per_tile: int,
                  tokens: ImageTokens) -> np.ndarray:
    """ids [seq] with one `tokens.image` placeholder per image -> ids with each placeholder replaced, in order,
    by that image's prompt."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    places = [i for i, t in enumerate(ids) if t == tokens.image]
    if len(places) != len(grids):
        raise RuntimeInputError(f"the prompt has {len(places)} image placeholders (id {tokens.image}) for "
                                f"{len(grids)} images")
    out: list[int] = []
    start = 0
    for place, grid in zip(places, grids):
        out += ids[start:place] + image_prompt(grid, tokens_per_tile, tokens)
        start = place + 1
    return np.array(out + ids[start:], dtype=np.int64)
