"""A sharded build of a spec with a vision tower (build --tp 2 of tiny-vision): rank 0 holds the vision encoder,
every rank's text graph reads its image features, and the host-side reducer gives the unsharded vision build's
logits within 1e-5 and its greedy tokens, with images in the prompt and across chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.build import VISION_DATA_FILE, VISION_FILE, BuildOptions, build
from l4compile.lower_vision import lower_vision
from l4compile.runtime import Engine
from l4compile.shard.build import build_sharded, dry_run_sharded
from l4compile.shard.plan import plan_spec, weight_bytes
from l4compile.weights import RandomWeights
from tests.conftest import load

IMAGE = 255
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root, spec = tmp_path_factory.mktemp("sharded-vision"), load("tiny-vision")
    build(spec, root / "tp1", RandomWeights(0), BuildOptions(target="trt"), log=QUIET)
    build_sharded(spec, root / "tp2", RandomWeights(0), BuildOptions(target="trt", tp=2), None, QUIET)
    return Engine.load(root / "tp1"), Engine.load(root / "tp2")


def image_prompt(rng, tiles: list[int]) -> np.ndarray:
    """Text, then each image's tokens (4 per tile), then text: images straddle chunk boundaries (chunk 8)."""
    parts = [rng.integers(3, 200, 5)]
    for n in tiles:
        parts += [np.full(4 * n, IMAGE), rng.integers(3, 200, 3)]
    return np.concatenate(parts).astype(np.int64)


def test_rank_0_holds_the_vision_encoder(engines):
    _, sharded = engines
    root = sharded.directory
    assert (root / "rank_0" / VISION_FILE).is_file() and (root / "rank_0" / VISION_DATA_FILE).is_file()
    assert not (root / "rank_1" / VISION_FILE).exists()
    assert sharded.manifest.vision["files"]["model"] == f"rank_0/{VISION_FILE}" and sharded.vision is not None
    assert sharded.manifest.sharding["tp"] == 2


def test_tp2_vision_logits_equal_the_unsharded_build(engines):
    single, sharded = engines
    rng = np.random.default_rng(0)
    ids = np.stack([image_prompt(rng, [1, 2]), image_prompt(rng, [2, 1])])   # 23 tokens each, batch 2
    pixels = rng.standard_normal((6, 3, 56, 56)).astype(np.float32)
    features = single.encode_images(pixels)
    np.testing.assert_array_equal(sharded.encode_images(pixels), features)   # the same encoder, run once
    want = single.logits(ids, pixel_values=pixels)
    np.testing.assert_allclose(sharded.logits(ids, pixel_values=pixels), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sharded.logits(ids, image_features=features), want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_tp2_vision_greedy_tokens_equal_the_unsharded_build(engines):
    single, sharded = engines
    rng = np.random.default_rng(1)
    ids = image_prompt(rng, [1, 2])[None]     # 23 tokens, then 14 new ones: decode crosses 24 and 32
    pixels = rng.standard_normal((3, 3, 56, 56)).astype(np.float32)
    want = single.generate(ids, 14, pixel_values=pixels, stop_tokens=())
    np.testing.assert_array_equal(sharded.generate(ids, 14, pixel_values=pixels, stop_tokens=()), want)
    assert list(sharded.stream(ids[0], 14, pixel_values=pixels, stop_tokens=())) == want[0, ids.shape[1]:].tolist()


def test_dry_run_plan_counts_the_vision_encoder_on_rank_0():
    spec = load("tiny-vision")
    report, plan = dry_run_sharded(spec, BuildOptions(target="trt", tp=2), None, QUIET)
    vision = weight_bytes(lower_vision(spec))
    assert report.files[f"rank_0/{VISION_DATA_FILE}"] == vision == plan.vision_weight_bytes > 0
    assert [r.vision_bytes for r in plan.ranks] == [vision, 0]
    assert plan.ranks[0].total_bytes == plan.ranks[0].weight_bytes + vision + plan.ranks[0].kv_cache_bytes
    total = sum(r.weight_bytes + r.vision_bytes for r in plan.ranks)
    assert total == plan.unsharded_weight_bytes + plan.replicated_weight_bytes + vision
    assert any("vision encoder" in line for line in plan.lines())


def test_full_size_plan_counts_scouts_vision_tower_on_rank_0():
    spec = load("scout")
    plan = plan_spec(spec, 2, "bfloat16", max_seq=4096)
    vision = weight_bytes(lower_vision(spec, "bfloat16"))
    assert 1.5e9 < vision < 2e9 and [r.vision_bytes for r in plan.ranks] == [vision, 0] and plan.fits
