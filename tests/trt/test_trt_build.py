"""`build --target trt` and `l4compile engine` where no engine can be built (this machine: no TensorRT, no GPU)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from l4compile.cli import main
from l4compile.runtime import Engine
from l4compile.trt import builder
from tests.conftest import spec_path, token_ids
from tests.trt import fakes
from tests.trt.conftest import NO_TRT


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Whatever this host has, the build sees no TensorRT."""
    monkeypatch.setattr(builder, "unavailable_reason", lambda: NO_TRT)


def test_build_without_tensorrt_writes_onnx_report_and_one_line(no_tensorrt, tmp_path, capsys):
    out = tmp_path / "tm-trt"
    assert main(["build", str(spec_path("tiny-maverick")), "--target", "trt", "--weights", "random",
                 "--max-batch", "2", "--max-seq", "64", "-o", str(out)]) == 0
    stderr = capsys.readouterr().err   # a warning of the progress reporter
    why = [line for line in stderr.splitlines() if "TensorRT engine" in line]
    assert why == [f"warning: no TensorRT engine: {NO_TRT}; the TensorRT-ready ONNX and compat.json are written; build the "
                   f"engine later on a GPU host with TensorRT: l4compile engine {out}"]
    assert {"model.onnx", "model.onnx.data", "compat.json", "compat.txt", "manifest.json"} == \
        {p.name for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "trt" and manifest["backend"] == "onnxruntime"
    assert manifest["trt"]["status"] == "pending" and manifest["trt"]["reason"] == NO_TRT
    assert (manifest["trt"]["max_batch"], manifest["trt"]["max_seq"]) == (2, 64)
    # the pending build runs on onnxruntime, through `l4compile run` too
    assert Engine.load(out).logits(token_ids(1, 3)).shape == (1, 3, 256)
    assert main(["run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().startswith("1,2,3,")


def test_engine_without_tensorrt_is_one_line_and_exit_1(no_tensorrt, trt_copy, capsys):
    directory = trt_copy("tiny-maverick")
    before = (directory / "manifest.json").read_text()
    assert main(["engine", str(directory)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"l4compile: error: cannot build a TensorRT engine here: {NO_TRT}; pip install")
    assert err.rstrip().endswith(f"then run: l4compile engine {directory}")
    assert (directory / "manifest.json").read_text() == before and not (directory / "model.plan").exists()


def test_engine_of_an_onnx_target_build_says_to_rebuild(built_tiny, capsys):
    assert main(["engine", str(built_tiny("tiny-scout"))]) == 1
    assert "was built for target 'onnx'; rebuild it with --target trt" in capsys.readouterr().err


def test_engine_flags_need_target_trt(tmp_path, capsys):
    assert main(["build", str(spec_path("tiny-scout")), "--weights", "random", "--precision", "fp16",
                 "-o", str(tmp_path / "x")]) == 1
    assert "--precision: TensorRT engine options apply to --target trt only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_incompatible_model_fails_the_build_and_writes_nothing(no_tensorrt, tmp_path, capsys):
    """Forcing onnxruntime's pipeline (com.microsoft MoE) onto the trt target: one line, nothing written."""
    out = tmp_path / "bad"
    assert main(["build", str(spec_path("tiny-maverick")), "--target", "trt", "--pipeline", "onnx-cpu",
                 "--weights", "random", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT would reject this model: node" in err and "com.microsoft" in err
    assert list(tmp_path.iterdir()) == []


def test_fp8_precision_without_fp8_qdq_is_refused(no_tensorrt, tmp_path, capsys):
    assert main(["build", str(spec_path("tiny-scout")), "--target", "trt", "--precision", "fp8",
                 "--weights", "random", "-o", str(tmp_path / "m")]) == 1
    assert "--precision fp8 needs explicit FP8 Q/DQ nodes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_for_trt_checks_compatibility(capsys):
    assert main(["build", str(spec_path("maverick")), "--target", "trt", "--dry-run", "--dtype", "bfloat16"]) == 0
    assert "dry run of maverick" in capsys.readouterr().out


def test_dry_run_for_trt_rejects_what_tensorrt_cannot_parse(capsys):
    """The onnx-cpu pipeline leaves onnxruntime's contrib ops (attention over the in-place cache, MoE),
    which no TensorRT parser accepts."""
    assert main(["build", str(spec_path("tiny-maverick")), "--target", "trt", "--dry-run",
                 "--pipeline", "onnx-cpu"]) != 0
    captured = capsys.readouterr()
    assert "dry run of" not in captured.out
    [line] = captured.err.strip().splitlines()
    assert line.startswith("l4compile: error: TensorRT would reject this model: node 'layers.0.self_attn")
    assert "domain 'com.microsoft' is not standard ONNX" in line


def test_runtime_says_what_is_missing_for_a_tensorrt_build(trt_copy, capsys, monkeypatch):
    from l4compile.runtime.errors import BuildDirError
    from l4compile.trt.profiles import EngineLimits, with_engine
    directory = trt_copy("tiny-scout")
    manifest = Engine.load(directory).manifest
    with_engine(manifest, EngineLimits("fp16", 1, 64), [], "10.15").write(directory)
    with pytest.raises(BuildDirError, match="engine file is missing; run: l4compile engine"):
        Engine.load(directory)
    (directory / "model.plan").write_bytes(b"not a plan")
    with monkeypatch.context() as without:      # whether or not this host has TensorRT
        without.setitem(sys.modules, "tensorrt", None)
        with pytest.raises(BuildDirError, match="runs on TensorRT, but tensorrt is not installed"):
            Engine.load(directory)
    with monkeypatch.context() as with_fake:    # TensorRT that cannot deserialize the file
        fakes.install(with_fake)
        with pytest.raises(BuildDirError, match="could not load model.plan .*rebuild it here: l4compile engine"):
            Engine.load(directory)
    expected = Engine.load(directory, backend="onnxruntime").generate(np.array([[1, 2, 3]]), 4, stop_tokens=())
    assert main(["run", str(directory), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--stop-ids", "999",
                 "--backend", "onnxruntime"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, expected[0]))
