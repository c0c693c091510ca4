"""Engine building and the TensorRT runtime backend, driven through fake `tensorrt` and cuda-python modules.

These prove our orchestration (API calls, profiles, timing cache, atomic files, manifest, buffer binding,
KV-cache handling, the errors for shapes an engine cannot run) and nothing about TensorRT: the fake
"engine" is onnxruntime running the same ONNX, inside the optimization profiles the build asked for and
with the output shapes the ONNX declares (tests/trt/fakes.py).
"""

from __future__ import annotations

import json
import sys

import onnx

import numpy as np
import pytest

from l4compile.cli import main
from l4compile.errors import BuildError
from l4compile.runtime import Engine, RuntimeInputError
from l4compile.trt import builder
from l4compile.trt.profiles import EngineOptions
from l4compile.trt.target import engine_command
from tests.conftest import spec_path, token_ids
from tests.trt import fakes


@pytest.fixture
def fake_trt(monkeypatch):
    return fakes.install(monkeypatch)


def test_availability(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert builder.unavailable_reason() == "tensorrt is not installed"
    fakes.install(monkeypatch, devices=0)
    assert builder.unavailable_reason() == "no CUDA GPU is visible"
    fakes.install(monkeypatch, devices=1)
    assert builder.unavailable_reason() is None


def test_engine_command_drives_the_tensorrt_api(fake_trt, trt_copy, capsys):
    rec, _, _ = fake_trt
    directory = trt_copy("tiny-maverick")
    assert main(["engine", str(directory), "--max-batch", "2", "--max-seq", "32"]) == 0
    assert "built TensorRT engine" in capsys.readouterr().out
    assert rec.named("create_network") == [("create_network", 0)]
    assert rec.named("parse_from_file") == [("parse_from_file", str(directory / "model.onnx"))]
    (_, flags, built, monitored), = rec.named("build_serialized_network")
    assert flags == ("FP16",) and monitored
    (prefill_shapes, prefill_values), (decode_shapes, decode_values) = built
    assert prefill_shapes["input_ids"] == ((1, 1), (2, 16), (2, 32))
    assert decode_shapes["past_key.3"] == ((0, 1, 1, 16), (15, 2, 1, 16), (31, 2, 1, 16))
    # only the input TensorRT makes a shape tensor gets values; every other input gets dimensions
    assert prefill_values == {"logits_start": ([0], [15], [31])} and decode_values == {"logits_start": ([0], [0], [0])}
    assert "past_length" not in prefill_shapes and "logits_start" not in prefill_shapes
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["files"]["engine"] == "model.plan"
    assert manifest["trt"]["status"] == "built" and manifest["trt"]["tensorrt_version"] == "10.15.1-fake"
    assert (directory / "model.plan").read_bytes().startswith(fakes.PLAN_MAGIC)
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_timing_cache_is_loaded_and_saved(fake_trt, trt_copy, tmp_path):
    rec, _, _ = fake_trt
    directory, cache = trt_copy("tiny-scout"), tmp_path / "shared.cache"
    engine_command(directory, EngineOptions(timing_cache=cache), log=lambda _: None)
    assert rec.named("create_timing_cache")[-1] == ("create_timing_cache", b"")
    first = cache.read_bytes()
    engine_command(directory, EngineOptions(timing_cache=cache, precision="fp32"), log=lambda _: None)
    assert rec.named("create_timing_cache")[-1] == ("create_timing_cache", first)
    assert rec.named("build_serialized_network")[-1][1] == ("-TF32",)   # fp32: no reduced precision, no TF32
    engine_command(directory, EngineOptions(), log=lambda _: None)
    assert (directory / "timing.cache").is_file()               # default: next to the engine


def test_parser_errors_are_one_line_and_change_nothing(fake_trt, trt_copy, monkeypatch):
    directory = trt_copy("tiny-scout")
    before = (directory / "manifest.json").read_text()
    fakes.reject_parse(monkeypatch, "layers.0/Loop", "Loop", "unsupported loop")
    with pytest.raises(BuildError) as err:
        engine_command(directory, EngineOptions(), log=lambda _: None)
    assert str(err.value) == ("TensorRT's ONNX parser rejected the model: node 'layers.0/Loop' (Loop): "
                              "unsupported loop (+1 more)")
    assert (directory / "manifest.json").read_text() == before and not (directory / "model.plan").exists()


def test_a_failed_engine_build_changes_nothing(fake_trt, trt_copy, monkeypatch):
    directory = trt_copy("tiny-scout")
    before = (directory / "manifest.json").read_text()
    fakes.fail_build(monkeypatch)
    with pytest.raises(BuildError, match="TensorRT could not build the engine"):
        engine_command(directory, EngineOptions(), log=lambda _: None)
    assert (directory / "manifest.json").read_text() == before and not (directory / "model.plan").exists()


def test_build_target_trt_builds_the_engine_when_tensorrt_is_there(fake_trt, tmp_path, capsys):
    out = tmp_path / "tm"
    assert main(["build", str(spec_path("tiny-maverick")), "--target", "trt", "--weights", "random",
                 "--precision", "fp32", "-o", str(out)]) == 0
    assert "no TensorRT engine" not in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["trt"]["precision"] == "fp32"
    assert {"model.plan", "timing.cache", "compat.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
def test_tensorrt_backend_passes_inputs_outputs_and_kv_cache_through_the_engine_intact(fake_trt, trt_copy, name):
    """The fake engine computes with onnxruntime on the same ONNX, so this shows that the backend's copies,
    buffer binding, profile choice and KV-cache handling lose nothing, not that TensorRT computes the same."""
    rec, _, cudart = fake_trt
    directory = trt_copy(name)
    engine_command(directory, EngineOptions(precision="fp32", max_batch=2, max_seq=64), log=lambda _: None)
    trt, ort = Engine.load(directory), Engine.load(directory, backend="onnxruntime")
    assert type(trt.backend).__name__ == "TensorRTBackend"
    ids = token_ids(2, 20, seed=1)
    np.testing.assert_allclose(trt.logits(ids), ort.logits(ids), atol=1e-5, rtol=0)
    prompt = token_ids(2, 6, seed=2)
    np.testing.assert_array_equal(trt.generate(prompt, 14, stop_tokens=()), ort.generate(prompt, 14, stop_tokens=()))
    profiles = [call[1] for call in rec.named("infer")]
    assert profiles[:2] == [0, 0] and set(profiles[2:]) == {1}   # logits, prefill, then decode steps
    assert rec.named("cudaMemcpyAsync") and all(n >= 0 for _, _, n in rec.named("cudaMemcpyAsync"))
    assert rec.named("error") == []
    trt.backend.close()
    assert cudart.memory == {}


def test_tensorrt_backend_refuses_shapes_outside_the_engine_profiles(fake_trt, trt_copy):
    rec, _, _ = fake_trt
    directory = trt_copy("tiny-scout")
    engine_command(directory, EngineOptions(precision="fp32", max_batch=1, max_seq=16), log=lambda _: None)
    engine = Engine.load(directory)
    outside = r"outside the engine's profile \(max batch 1, max seq 16\); rebuild with l4compile engine"
    with pytest.raises(RuntimeInputError, match=rf"input input_ids of shape \(2, 4\) is {outside}"):
        engine.logits(token_ids(2, 4))
    with pytest.raises(RuntimeInputError, match=rf"input input_ids of shape \(1, 17\) is {outside}"):
        engine.logits(token_ids(1, 17))
    # decode runs until the global layer's cache holds 16 positions; the decode profile ends at 15
    with pytest.raises(RuntimeInputError, match=rf"input past_key.3 of shape \(16, 1, 2, 16\) is {outside}"):
        engine.generate(token_ids(1, 10), 10, stop_tokens=())
    assert len(rec.named("error")) == 3
    np.testing.assert_array_equal(engine.generate(token_ids(1, 10), 6, stop_tokens=()),     # still usable
                                  Engine.load(directory, backend="onnxruntime").generate(token_ids(1, 10), 6,
                                                                                         stop_tokens=()))


def test_tensorrt_backend_refuses_an_output_of_data_dependent_shape(fake_trt, trt_copy):
    """An output whose size the input shapes do not fix (TensorRT reports -1 before running) needs an
    output allocator, which the backend does not have: it says so instead of binding a wrong-sized buffer."""
    directory = trt_copy("tiny-scout")
    model = onnx.load(directory / "model.onnx", load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "selected_positions"
    onnx.save(model, directory / "model.onnx")
    engine_command(directory, EngineOptions(precision="fp32"), log=lambda _: None)
    with pytest.raises(RuntimeError, match=r"output logits has a data-dependent shape \(1, -1, 256\)"):
        Engine.load(directory).logits(token_ids(1, 4))


def test_tensorrt_backend_refuses_steps_its_profiles_do_not_cover(fake_trt, trt_copy):
    directory = trt_copy("tiny-scout")
    engine_command(directory, EngineOptions(precision="fp32"), log=lambda _: None)
    engine = Engine.load(directory)
    cache = engine.new_cache(batch=1, max_length=16)
    engine.step(token_ids(1, 4), cache, logits_start=0)
    with pytest.raises(RuntimeInputError, match="prefill .* and one-token decode steps; got 3 tokens after 4"):
        engine.step(token_ids(1, 3), cache, logits_start=0)
