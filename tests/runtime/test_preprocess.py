"""Llama 4's image preprocessing and prompt expansion (runtime/preprocess.py) against values derived by hand from
transformers' Llama4ImageProcessor / Llama4Processor (whose torchvision dependency cannot be installed here, so the
reference cannot run): its docstring examples, and tile grids worked out from get_best_fit for several aspect ratios."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.runtime import RuntimeInputError
from l4compile.runtime.preprocess import (LLAMA4_IMAGE_TOKENS, ImageTokens, best_fit_grid, expand_prompt, image_prompt,
                                          normalize, preprocess_image, resize, resized_size, split_tiles,
                                          supported_grids)


def test_supported_grids_in_the_reference_order():
    # find_supported_resolutions' docstring, max_num_chunks=4: ratios 0.25, 1, 4, 1/3, 3, 0.5, 2 in that order
    assert supported_grids(4) == [(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)]
    assert len(supported_grids(16)) == sum(len([d for d in range(1, n + 1) if n % d == 0]) for n in range(1, 17))


def test_docstring_examples_of_the_reference():
    # get_best_fit((200, 300), [[224,672],[672,224],[224,448],[448,224],[224,224]]) == [224, 448]: scales 1.12 for
    # (1,3) and (1,2), the smaller canvas wins. With max 3 tiles of 224 the same candidates exist.
    assert best_fit_grid(200, 300, 224, 3) == (1, 2)
    # get_max_res_without_distortion([200, 300], [450, 200]) and ([800, 600], [450, 1300]): its docstring says
    # (134, 200) and (450, 338), but its code floors: floor(200 * 200/300) = 133, floor(600 * 450/800) = 337
    assert resized_size(200, 300, (450, 200), 1, resize_to_max_canvas=True) == (133, 200)
    assert resized_size(800, 600, (450, 1300), 1, resize_to_max_canvas=True) == (450, 337)


# (height, width) -> grid, size before padding, tiles (with the global thumbnail when > 1 tile): worked out by hand
ASPECTS = {
    (336, 336): ((1, 1), (336, 336), 1),      # exactly one tile: scale 1 on every canvas >= 336, smallest wins
    (672, 336): ((2, 1), (672, 336), 3),      # tall: 2x1 at scale 1
    (1000, 500): ((3, 2), (1000, 500), 7),    # smallest upscale 1.008 on 3x2..3x5, 3x2 smallest; no resize, pad
    (4000, 3000): ((4, 3), (1344, 1008), 13),  # must shrink: best 0.336 on 4x3, 4x4, 5x3; 4x3 smallest
    (100, 50): ((1, 1), (336, 168), 1),       # small: upscaled to one tile without distortion
    (300, 1200): ((1, 4), (300, 1200), 5),    # wide: 1.12 on 1x4 (height stays 300: never upscaled past a tile)
}


@pytest.mark.parametrize("size", list(ASPECTS), ids=[f"{h}x{w}" for h, w in ASPECTS])
def test_tile_grids_for_several_aspect_ratios(size):
    grid, resized, tiles = ASPECTS[size]
    assert best_fit_grid(*size, 336, 16) == grid
    assert resized_size(*size, grid, 336) == resized
    if size[0] * size[1] > 10**6:
        return   # the pixel pipeline of a 12-megapixel image takes seconds; its grid arithmetic is what is checked
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels, got_grid = preprocess_image(image, 336, 16)
    assert got_grid == grid and pixels.shape == (tiles, 3, 336, 336) and pixels.dtype == np.float32
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_max_tiles_limits_the_grid():
    assert best_fit_grid(4000, 3000, 336, 4) == (2, 2)   # 0.168 on 2x2 (4 tiles), the best of at most 4
    assert best_fit_grid(336, 3360, 336, 4) == (1, 4)


def test_padding_normalization_and_tile_order():
    """A 672x336 image of constant 255 above constant 0: tile 0 is all +1, tile 1 all -1 (rescale, normalize);
    a 336x500 image padded to 336x672: the padding is 0 -> -1."""
    image = np.zeros((672, 336, 3), np.uint8)
    image[:336] = 255
    pixels, grid = preprocess_image(image)
    assert grid == (2, 1)
    np.testing.assert_array_equal(pixels[0], 1.0)
    np.testing.assert_array_equal(pixels[1], -1.0)
    pixels, grid = preprocess_image(np.full((336, 500, 3), 255, np.uint8))
    assert grid == (1, 2)
    np.testing.assert_array_equal(pixels[0], 1.0)
    np.testing.assert_array_equal(pixels[1][:, :, :500 - 336], 1.0)
    np.testing.assert_array_equal(pixels[1][:, :, 500 - 336:], -1.0)


def test_normalize_rounds_like_bfloat16():
    x = np.arange(256, dtype=np.float32).reshape(1, 1, 256).repeat(3, 0)
    out = normalize(x)
    bits = out.view(np.uint32)
    assert (bits & 0xFFFF).max() == 0          # representable in bfloat16
    np.testing.assert_allclose(out, (x / 255 - 0.5) / 0.5, atol=8e-3)
    assert out[0, 0, 0] == -1 and out[0, 0, 255] == 1


def test_resize_and_split():
    image = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    np.testing.assert_allclose(resize(image, 4, 6), image, atol=1e-5)   # same size: identity
    half = resize(np.array([[[0, 2, 4, 6]]], np.float32), 1, 2)
    # halving: the triangle filter widens to 2 input pixels each side; output 0 (center 1.0) reads pixels 0, 1, 2
    # with weights 3/7, 3/7, 1/7: 10/7; output 1 (center 3.0) reads 1, 2, 3 with 1/7, 3/7, 3/7: 32/7
    np.testing.assert_allclose(half, [[[10 / 7, 32 / 7]]], atol=1e-6)
    tiles = split_tiles(np.arange(2 * 4 * 6).reshape(2, 4, 6), (2, 3))
    assert tiles.shape == (6, 2, 2, 2)
    np.testing.assert_array_equal(tiles[1, 0], [[2, 3], [8, 9]])   # row 0, column 1


T = ImageTokens(image_start=250, image_end=251, tile_x=252, tile_y=253, image=254, patch=255)


def test_image_prompt_of_one_tile_and_of_a_grid():
    assert image_prompt((1, 1), 3, T) == [250, 254, 255, 255, 255, 251]
    # 2 rows x 3 cols of 2 patches: row = P P x P P x P P y
    row = [255, 255, 252, 255, 255, 252, 255, 255, 253]
    assert image_prompt((2, 3), 2, T) == [250] + row + row + [254, 255, 255, 251]
    # a 4x3 grid of 144: the count Llama4Processor gives (12 + 1 global tiles of 144, 4*2 x-separators, 4 y, 4 markers)
    assert len(image_prompt((4, 3), 144, LLAMA4_IMAGE_TOKENS)) == 13 * 144 + 8 + 4 + 3


def test_expand_prompt_replaces_placeholders_in_order():
    ids = [1, 254, 7, 254, 8]
    out = expand_prompt(ids, [(1, 1), (1, 2)], 1, T)
    assert out.tolist() == [1, 250, 254, 255, 251, 7, 250, 255, 252, 255, 253, 254, 255, 251, 8]
    with pytest.raises(RuntimeInputError, match="2 image placeholders"):
        expand_prompt(ids, [(1, 1)], 1, T)


def test_images_from_files_and_bad_images(tmp_path):
    from PIL import Image
    array = np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    from_file, grid = preprocess_image(tmp_path / "a.png", 28, 4)
    from_array, _ = preprocess_image(array, 28, 4)
    np.testing.assert_array_equal(from_file, from_array)
    assert grid == best_fit_grid(40, 90, 28, 4)
    from_pil, _ = preprocess_image(Image.fromarray(array), 28, 4)
    np.testing.assert_array_equal(from_pil, from_array)
    for bad in (np.zeros((5, 5, 4)), np.zeros((0, 5, 3)), np.zeros(7), tmp_path / "missing.png"):
        with pytest.raises(RuntimeInputError):
            preprocess_image(bad)
