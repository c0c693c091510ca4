"""The tiny-vision spec (tiny-scout plus a vision tower) built with random weights: the vision model beside the
text model, its ONNX on onnxruntime equal to the torch reference, fusion through every text pipeline, decoding
with the KV cache after an image prompt, TensorRT compatibility, and quantization leaving the tower alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from l4compile.build import VISION_FILE, BuildOptions, build, dry_run
from l4compile.emit.torch_module import GraphModule
from l4compile.lower import lower
from l4compile.lower_vision import lower_vision, tokens_per_tile
from l4compile.runtime import Engine
from l4compile.weights.random import RandomWeights
from tests.conftest import load

ATOL = 1e-4
IMAGE = 255


@pytest.fixture(scope="module")
def spec():
    return load("tiny-vision")


def image_prompt(rng, tiles: int, per_tile: int) -> np.ndarray:
    return np.concatenate([rng.integers(3, 200, 5), np.full(tiles * per_tile, IMAGE), rng.integers(3, 200, 7)])[None]


@pytest.mark.parametrize("pipeline", ["onnx-cpu", "trt", "none"])
def test_vision_build_matches_torch_reference(spec, pipeline, tmp_path):
    build(spec, tmp_path / "b", RandomWeights(0), BuildOptions(pipeline=pipeline), log=lambda _: None)
    engine = Engine.load(tmp_path / "b")
    assert engine.manifest.vision["tokens_per_tile"] == tokens_per_tile(spec.vision) == 4
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, 56, 56)).astype(np.float32)
    ids = image_prompt(rng, 3, 4)
    with torch.no_grad():
        want_features = GraphModule(lower_vision(spec), RandomWeights(0))(torch.from_numpy(pixels))
        want = GraphModule(lower(spec, kv_cache=False), RandomWeights(0))(torch.from_numpy(ids), want_features)
    features = engine.encode_images(pixels)
    np.testing.assert_allclose(features, want_features.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine.logits(ids, image_features=features), want.numpy(), atol=ATOL, rtol=0)


def test_decoding_after_an_image_equals_full_forward(spec, tmp_path):
    """Prefill with the image, then KV-cache decode steps (empty features) give the greedy tokens of full forwards."""
    build(spec, tmp_path / "b", RandomWeights(1), BuildOptions(), log=lambda _: None)
    engine = Engine.load(tmp_path / "b")
    rng = np.random.default_rng(1)
    ids = image_prompt(rng, 1, 4)
    pixels = rng.standard_normal((1, 3, 56, 56)).astype(np.float32)
    features = engine.encode_images(pixels)
    out = engine.generate(ids, max_new_tokens=12, image_features=features, stop_tokens=())
    module = GraphModule(lower(spec, kv_cache=False), RandomWeights(1))
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            logits = module(torch.from_numpy(seq), torch.from_numpy(features))
            seq = np.concatenate([seq, logits[:, -1].argmax(-1).numpy()[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)
    streamed = list(engine.stream(ids[0], max_new_tokens=12, pixel_values=pixels, stop_tokens=()))
    assert streamed == out[0, ids.shape[1]:].tolist()


def test_in_place_cache_splits_features_by_piece_and_row(spec, tmp_path):
    """The in-place build runs prefills in pieces that stop at chunk boundaries, and a batch row by row: each
    piece gets the features of its own image tokens. Equal to the sequence-major build (one run) and to the
    torch reference, for two rows whose images straddle chunk boundaries at different places."""
    from l4compile.runtime.ort_backend import split_features
    build(spec, tmp_path / "in-place", RandomWeights(3), BuildOptions(), log=lambda _: None)
    build(spec, tmp_path / "seq", RandomWeights(3), BuildOptions(pipeline="trt"), log=lambda _: None)
    in_place, sequence_major = Engine.load(tmp_path / "in-place"), Engine.load(tmp_path / "seq")
    assert in_place.manifest.kv_cache["in_place"] and not sequence_major.manifest.kv_cache.get("in_place")
    rng = np.random.default_rng(3)
    rows = [np.concatenate([rng.integers(3, 200, 3), np.full(8, IMAGE), rng.integers(3, 200, 2), np.full(4, IMAGE),
                            rng.integers(3, 200, 4)]),
            np.concatenate([rng.integers(3, 200, 7), np.full(12, IMAGE), rng.integers(3, 200, 2)])]
    ids = np.stack(rows)   # images at 3..10 and 13..16 (row 0), 7..18 (row 1): every one crosses a boundary
    features = in_place.encode_images(rng.standard_normal((6, 3, 56, 56)).astype(np.float32))
    parts = split_features(features, np.split(ids[:1], [8, 16], axis=1), IMAGE)
    assert [len(p) for p in parts] == [5, 6, 1]
    np.testing.assert_array_equal(np.concatenate(parts), features[:12])
    got = in_place.logits(ids, image_features=features)
    np.testing.assert_allclose(got, sequence_major.logits(ids, image_features=features), atol=ATOL, rtol=0)
    with torch.no_grad():
        want = GraphModule(lower(spec, kv_cache=False), RandomWeights(3))(torch.from_numpy(ids),
                                                                           torch.from_numpy(features))
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)
    out = in_place.generate(ids, max_new_tokens=6, image_features=features, stop_tokens=())
    np.testing.assert_array_equal(out, sequence_major.generate(ids, max_new_tokens=6, image_features=features,
                                                               stop_tokens=()))


def test_vision_graph_passes_the_tensorrt_check(spec):
    report = dry_run(spec, BuildOptions(target="trt"), log=lambda _: None)
    assert VISION_FILE in report.files and report.files["vision.onnx.data"] > 0


def test_quantization_leaves_the_vision_tower_in_high_precision(spec, tmp_path):
    build(spec, tmp_path / "b", RandomWeights(0), BuildOptions(quantize="int4", int4_method="rtn"),
          log=lambda _: None)
    model = onnx.load(tmp_path / "b" / VISION_FILE, load_external_data=False)
    weights = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(weights) > 20 and {t.data_type for t in weights} == {onnx.TensorProto.FLOAT}
    assert not any(n.op_type in ("MatMulNBits", "DequantizeLinear") for n in model.graph.node)
    engine = Engine.load(tmp_path / "b")
    assert engine.encode_images(np.zeros((1, 3, 56, 56), np.float32)).shape == (4, 64)


def test_run_with_an_image_file(spec, tmp_path):
    """`l4compile run BUILD --image FILE`: tiling, prompt expansion and generation, the same as the Python API."""
    import subprocess
    import sys
    from PIL import Image
    from l4compile.runtime.preprocess import ImageTokens
    build(spec, tmp_path / "b", RandomWeights(2), BuildOptions(), log=lambda _: None)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    tokens = ImageTokens(image_start=250, image_end=251, tile_x=252, tile_y=253, image=254, patch=255)
    engine = Engine.load(tmp_path / "b")
    ids, pixels = engine.prepare_images(np.array([1, 254, 5, 6]), [tmp_path / "a.png"], tokens)
    # 60x120 on 56-pixel tiles: no shrinking needs 2 rows (112 >= 60) and 3 columns (168 >= 120): 6 tiles + thumbnail
    assert pixels.shape == (7, 3, 56, 56) and ids.shape[1] == 4 - 1 + 1 + 2 * (3 * 4 + 2 + 1) + 1 + 4 + 1
    want = engine.generate(ids, max_new_tokens=4, pixel_values=pixels, stop_tokens=())[0].tolist()
    run = [sys.executable, "-m", "l4compile.cli", "run", str(tmp_path / "b"), "--prompt-ids", "1,5,6",
           "--max-new-tokens", "4", "--stop-ids", "999", "--image", str(tmp_path / "a.png")]
    r = subprocess.run(run + ["--image-token-ids", "250,251,252,253,254,255"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.strip().split(",")] == want   # no placeholder: the image goes after BOS
    r = subprocess.run(run, capture_output=True, text=True)   # a toy vocabulary: no default image tokens
    assert r.returncode != 0 and "Traceback" not in r.stderr and "image prompt tokens" in r.stderr


def test_inspect_counts_the_vision_graph(spec):
    """inspect's vision parameters and matmul FLOPs per tile equal what the lowered vision graph holds and computes."""
    from l4compile.inspect import build_report
    graph = lower_vision(spec)
    report = build_report(spec)["vision"]
    assert report["params"] == sum(p.type.numel() for p in graph.params())
    matmul = 0
    for node in graph.topo_nodes():
        if node.op == "linear":
            x, w = (graph.type_of(v) for v in node.inputs)
            rows = 1
            for d in x.shape[:-1]:   # one tile: "tiles" is 1, "tiles*4" is 4
                rows *= d if isinstance(d, int) else int(d.split("*")[1]) if "*" in d else 1
            matmul += 2 * rows * w.numel()
    assert report["flops_per_tile_parts"]["matmul"] == matmul and report["tokens_per_tile"] == 4


def test_damaged_vision_model_is_one_error_without_onnxruntime_logs(spec, tmp_path, capfd):
    """As for the text model: onnxruntime's failure on vision.onnx is a BuildDirError naming the file."""
    import json
    from l4compile.runtime.errors import BuildDirError
    build(spec, tmp_path / "b", RandomWeights(0), BuildOptions(), log=lambda _: None)
    path = tmp_path / "b" / VISION_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest.pop("checksums")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    capfd.readouterr()
    with pytest.raises(BuildDirError, match=rf"{VISION_FILE}: onnxruntime cannot load the model"):
        Engine.load(tmp_path / "b")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
