"""The TensorRT side of a sharded build, without GPUs: per-rank engines through the fake `tensorrt` module
(tests/trt/fakes.py: proves our API calls, nothing about TensorRT), the multi-device flag, and the
one-line answers where TensorRT or NCCL is absent."""

from __future__ import annotations

import json

import pytest

from l4compile.build import BuildOptions
from l4compile.cli import main
from l4compile.runtime import Engine
from l4compile.runtime.errors import BuildDirError
from l4compile.runtime import trt_launcher
from l4compile.shard.build import build_sharded
from l4compile.trt import builder
from l4compile.weights import RandomWeights
from tests.conftest import load
from tests.trt import fakes
from tests.trt.conftest import NO_TRT


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "unavailable_reason", lambda: NO_TRT)
    out = tmp_path / "tm-tp2"
    build_sharded(load("tiny-maverick"), out, RandomWeights(0), BuildOptions(target="trt", tp=2), None,
                  lambda *_: None)
    monkeypatch.undo()
    return out


def test_without_tensorrt_the_build_says_so_once_and_runs_on_cpu(sharded):
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["trt"]["status"] == "pending"
    for rank in (0, 1):
        rank_manifest = json.loads((sharded / f"rank_{rank}" / "manifest.json").read_text())
        assert rank_manifest["sharding"] == {"tp": 2, "rank": rank}
        assert rank_manifest["layers"][0]["num_kv_heads"] == 1 and (sharded / f"rank_{rank}" / "compat.json").is_file()
    with pytest.raises(BuildDirError, match="not a sharded build|no TensorRT engines yet"):
        trt_launcher.launch(sharded, [1, 2, 3], 4)


def test_engine_command_builds_one_multi_device_engine_per_rank(sharded, monkeypatch, capsys):
    rec, _, _ = fakes.install(monkeypatch)
    assert main(["engine", str(sharded)]) == 0
    parsed = [call[1] for call in rec.named("parse_from_file")]
    assert parsed == [str(sharded / "rank_0" / "model.onnx"), str(sharded / "rank_1" / "model.onnx")]
    assert rec.named("set_preview_feature") == [("set_preview_feature", "MULTIDEVICE_RUNTIME_10_16", True)] * 2
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt"
    assert all((sharded / f"rank_{r}" / "model.plan").is_file() for r in (0, 1))
    with pytest.raises(BuildDirError, match="runs one engine per GPU: python -m l4compile.runtime.trt_launcher"):
        Engine.load(sharded)
    capsys.readouterr()
    monkeypatch.setattr(trt_launcher, "unavailable_reason", lambda: "nccl.core is not installed")
    assert trt_launcher.main([str(sharded), "--prompt-ids", "1,2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot launch 2 TensorRT ranks here: nccl.core is not installed" in err[0]
