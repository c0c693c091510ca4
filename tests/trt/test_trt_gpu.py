"""Real TensorRT on a real GPU: skipped, with the reason, where either is missing.

Written against the TensorRT 10 Python API; not yet run on a GPU (see README, "What is verified, where").
Run them on a GPU host with `pip install -e '.[dev,trt]' && pytest -m gpu -rs`.
"""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.cli import main
from l4compile.runtime import Engine
from l4compile.trt.builder import unavailable_reason
from l4compile.trt.profiles import EngineOptions
from l4compile.trt.target import engine_command
from tests.conftest import TINY_SPECS, token_ids

REASON = unavailable_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a GPU: {REASON}")]


@pytest.mark.parametrize("name", TINY_SPECS)
def test_fp32_engine_matches_onnxruntime(name, trt_copy):
    directory = trt_copy(name)
    engine_command(directory, EngineOptions(precision="fp32", max_batch=2, max_seq=64))
    trt, ort = Engine.load(directory), Engine.load(directory, backend="onnxruntime")
    assert trt.manifest.backend == "tensorrt" and type(trt.backend).__name__ == "TensorRTBackend"
    ids = token_ids(2, 20, seed=3)
    np.testing.assert_allclose(trt.logits(ids), ort.logits(ids), atol=1e-4, rtol=0)
    prompt = token_ids(2, 5, seed=4)
    np.testing.assert_array_equal(trt.generate(prompt, 24, stop_tokens=()), ort.generate(prompt, 24, stop_tokens=()))


def test_fp16_engine_is_close(trt_copy):
    directory = trt_copy("tiny-maverick")
    engine_command(directory, EngineOptions(precision="fp16", max_batch=1, max_seq=64))
    ids = token_ids(1, 20, seed=5)
    np.testing.assert_allclose(Engine.load(directory).logits(ids),
                               Engine.load(directory, backend="onnxruntime").logits(ids), atol=5e-2, rtol=0)


def test_run_picks_tensorrt_and_timing_cache_is_reused(trt_copy, tmp_path, capsys):
    directory, cache = trt_copy("tiny-scout"), tmp_path / "timing.cache"
    assert main(["engine", str(directory), "--precision", "fp32", "--max-seq", "32", "--timing-cache", str(cache)]) == 0
    assert cache.stat().st_size > 0
    assert main(["engine", str(directory), "--precision", "fp32", "--max-seq", "32", "--timing-cache", str(cache)]) == 0
    capsys.readouterr()
    assert main(["run", str(directory), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--stop-ids", "999"]) == 0
    got = capsys.readouterr().out.strip()
    expected = Engine.load(directory, backend="onnxruntime").generate(np.array([[1, 2, 3]]), 8, stop_tokens=())
    assert got == ",".join(map(str, expected[0]))


def test_vision_engines_match_onnxruntime(trt_copy):
    """tiny-vision: the vision engine (tiles in batches of --max-tiles) and the text engine fed its features."""
    directory = trt_copy("tiny-vision")
    engine_command(directory, EngineOptions(precision="fp32", max_batch=1, max_seq=64, max_tiles=3))
    trt, ort = Engine.load(directory), Engine.load(directory, backend="onnxruntime")
    rng = np.random.default_rng(6)
    pixels = rng.standard_normal((4, 3, 56, 56)).astype(np.float32)
    np.testing.assert_allclose(trt.encode_images(pixels), ort.encode_images(pixels), atol=1e-4, rtol=0)
    ids = np.concatenate([rng.integers(3, 200, 5), np.full(16, 255), rng.integers(3, 200, 4)])[None]
    np.testing.assert_allclose(trt.logits(ids, pixel_values=pixels), ort.logits(ids, pixel_values=pixels),
                               atol=1e-4, rtol=0)
    np.testing.assert_array_equal(trt.generate(ids, 12, pixel_values=pixels, stop_tokens=()),
                                  ort.generate(ids, 12, pixel_values=pixels, stop_tokens=()))
