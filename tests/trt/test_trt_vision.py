"""`--target trt` with a vision spec (tiny-vision): the vision model's TensorRT-ready ONNX, its compat report and its
own engine (vision.plan, one profile of 1..max_tiles tiles) beside the text engine, and the runtime running both.

Through the fake `tensorrt` / cuda-python of tests/trt/fakes.py (their engine is onnxruntime on the same ONNX, kept
to the built profiles): this proves our orchestration (profiles, files, manifest, batching of tiles, image features
fed to the text engine), not what TensorRT computes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from l4compile.cli import main
from l4compile.runtime import Engine
from l4compile.trt.profiles import EngineOptions
from l4compile.trt.target import engine_command
from tests.conftest import spec_path
from tests.trt import fakes

IMAGE = 255


@pytest.fixture
def fake_trt(monkeypatch):
    return fakes.install(monkeypatch)


def image_prompt(rng, tiles: int) -> np.ndarray:
    return np.concatenate([rng.integers(3, 200, 5), np.full(4 * tiles, IMAGE), rng.integers(3, 200, 4)])[None]


def test_build_target_trt_writes_and_builds_the_vision_engine(fake_trt, tmp_path):
    rec, _, cudart = fake_trt
    out = tmp_path / "tv"
    assert main(["build", str(spec_path("tiny-vision")), "--target", "trt", "--weights", "random", "--precision",
                 "fp32", "--max-seq", "64", "--max-tiles", "3", "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    vision = manifest["vision"]
    assert manifest["backend"] == "tensorrt" and vision["files"]["engine"] == "vision.plan"
    assert vision["trt"]["status"] == "built" and vision["trt"]["max_tiles"] == 3
    assert {"vision.plan", "vision_compat.json", "vision_compat.txt", "model.plan"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "vision_compat.json").read_text())["ok"]
    (_, text_flags, text_profiles, _), (_, flags, profiles, _) = rec.named("build_serialized_network")
    assert flags == text_flags == ("-TF32",)
    assert profiles == [({"pixel_values": ((1, 3, 56, 56), (3, 3, 56, 56), (3, 3, 56, 56))}, {})]
    assert text_profiles[0][0]["image_features"] == ((0, 64), (0, 64), (64, 64))   # prefill: up to batch x seq
    assert text_profiles[1][0]["image_features"] == ((0, 64), (0, 64), (0, 64))    # decode: no images

    # the fake plan names the ONNX it was built from, here in the build's temporary directory: build again in place
    engine_command(out, EngineOptions(precision="fp32", max_seq=64, max_tiles=3), log=lambda _: None)
    trt, ort = Engine.load(out), Engine.load(out, backend="onnxruntime")
    assert type(trt.vision._session).__name__ == "TensorRTVisionRunner"
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((7, 3, 56, 56)).astype(np.float32)     # 7 tiles: batches of 3, 3 and 1
    np.testing.assert_allclose(trt.encode_images(pixels), ort.encode_images(pixels), atol=1e-5, rtol=0)
    tiles = [call[2]["pixel_values"][0] for call in rec.named("infer") if "pixel_values" in call[2]]
    assert tiles == [3, 3, 1]
    ids = image_prompt(rng, 7)
    np.testing.assert_allclose(trt.logits(ids, pixel_values=pixels), ort.logits(ids, pixel_values=pixels),
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(trt.generate(ids, 10, pixel_values=pixels, stop_tokens=()),
                                  ort.generate(ids, 10, pixel_values=pixels, stop_tokens=()))
    assert trt.generate(ids[:, :5], 3, stop_tokens=()).shape == (1, 8)   # text only: empty features
    assert rec.named("error") == []
    trt.backend.close()
    trt.vision._session.backend.close()
    assert cudart.memory == {}


def test_without_tensorrt_the_vision_engine_is_pending_then_built_by_engine(trt_built, fake_trt, tmp_path, capsys):
    import shutil
    directory = tmp_path / "tv"
    shutil.copytree(trt_built("tiny-vision"), directory)      # built without TensorRT
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["vision"]["trt"]["status"] == "pending"
    assert "engine" not in manifest["vision"]["files"] and (directory / "vision_compat.json").is_file()
    assert not (directory / "vision.plan").exists()
    assert main(["engine", str(directory), "-q"]) == 0
    assert "and vision engine (fp16, max 17 tiles)" in capsys.readouterr().out
    built = json.loads((directory / "manifest.json").read_text())
    assert built["backend"] == "tensorrt" and built["vision"]["trt"]["status"] == "built"
    assert built["vision"]["trt"]["max_tiles"] == 17 and (directory / "vision.plan").is_file()
    assert main(["verify", str(directory)]) == 0      # checksums recorded afresh for the new files


def test_sharded_vision_build_gets_its_vision_engine_on_rank_0(fake_trt, tmp_path):
    from l4compile.build import BuildOptions
    from l4compile.shard.build import build_sharded
    from l4compile.weights import RandomWeights
    from tests.conftest import load
    out = tmp_path / "tp2"
    build_sharded(load("tiny-vision"), out, RandomWeights(0), BuildOptions(target="trt", tp=2), None, lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vision"]["files"]["engine"] == "rank_0/vision.plan" and (out / "rank_0" / "vision.plan").is_file()
    assert not (out / "rank_1" / "vision.plan").exists()
    rank1 = json.loads((out / "rank_1" / "manifest.json").read_text())
    assert rank1["vision"]["files"] is None and "trt" not in rank1["vision"]
    ids = image_prompt(np.random.default_rng(1), 1)
    pixels = np.random.default_rng(2).standard_normal((1, 3, 56, 56)).astype(np.float32)
    on_cpu = Engine.load(out, backend="onnxruntime")   # the host reducer: every rank here, ORT's vision model
    assert on_cpu.logits(ids, pixel_values=pixels).shape == (1, ids.shape[1], 256)
