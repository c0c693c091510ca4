"""Corrupt builds: every fault is one BuildDirError naming the file; checksums catch same-size damage."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from l4compile.cli import main
from l4compile.runtime import Engine
from l4compile.runtime.errors import BuildDirError
from l4compile.runtime.manifest import Manifest


@pytest.fixture
def build(built_tiny, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(built_tiny("tiny-scout"), out)
    return out


def flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(build, edit) -> None:
    path = build / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_manifest_records_every_file(build):
    manifest = Manifest.read(build)
    assert sorted(manifest.checksums) == ["model.onnx", "model.onnx.data"]
    for name, info in manifest.checksums.items():
        assert info["bytes"] == (build / name).stat().st_size and len(info["sha256"]) == 64
    import hashlib
    assert manifest.checksums["model.onnx.data"]["sha256"] == \
        hashlib.sha256((build / "model.onnx.data").read_bytes()).hexdigest()


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "model.onnx.data").unlink(), r"model\.onnx\.data: the build's weights file is missing"),
    (lambda b: (b / "model.onnx").unlink(), r"model\.onnx: the build's model file is missing"),
    (lambda b: (b / "model.onnx.data").write_bytes((b / "model.onnx.data").read_bytes()[:-100]),
     r"model\.onnx\.data: .* bytes, the manifest records .* \(truncated"),
    (lambda b: (b / "model.onnx").write_bytes(b"x" * 10), r"model\.onnx: 10 bytes, the manifest records"),
])
def test_missing_or_truncated_files(damage, message, build, capsys):
    damage(build)
    with pytest.raises(BuildDirError, match=message):
        Engine.load(build)
    assert main(["run", str(build), "--prompt-ids", "1,2"]) == 1
    assert main(["verify", str(build)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


def test_same_size_damage_is_caught_by_checksums(build, built_tiny, capsys):
    ids = np.array([[1, 2, 3]])
    want = Engine.load(built_tiny("tiny-scout")).logits(ids)
    data = build / "model.onnx.data"
    flip_byte(data, data.stat().st_size // 8 * 4 + 3)   # the sign and exponent of a float in the middle
    assert not np.array_equal(Engine.load(build).logits(ids), want)   # sizes match: loads, gives garbage
    with pytest.raises(BuildDirError, match=r"model\.onnx\.data: checksum mismatch"):
        Engine.load(build, verify=True)
    assert main(["verify", str(build)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.onnx.data: checksum mismatch" in err


def test_verify_a_good_build(build, capsys):
    assert main(["verify", str(build)]) == 0
    assert "2 files" in capsys.readouterr().out
    Engine.load(build, verify=True)


def test_damaged_model_is_one_error_without_onnxruntime_logs(build, capfd):
    """A model file edited without its checksum (or a build without checksums): onnxruntime's failure is
    a BuildDirError naming the file, and onnxruntime prints nothing of its own."""
    path = build / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    edit_manifest(build, lambda m: m.pop("checksums"))
    capfd.readouterr()
    with pytest.raises(BuildDirError, match=r"model\.onnx: onnxruntime cannot load the model"):
        Engine.load(build)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_old_builds_without_checksums_still_load(build, capsys):
    edit_manifest(build, lambda m: m.pop("checksums"))
    Engine.load(build).logits(np.array([[1, 2]]))
    Engine.load(build, verify=True)   # nothing to compare: presence only
    assert main(["verify", str(build)]) == 1
    assert "records no checksums" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(vocab_size="256"), "field vocab_size: unexpected value"),
    (lambda m: m.update(vocab_size=True), "field vocab_size"),
    (lambda m: m.pop("layers"), "missing field layers"),
    (lambda m: m.update(surprise=1), "unknown field surprise"),
    (lambda m: m["layers"][0].update(attention="sideways"), r"field layers\[0\]\.attention"),
    (lambda m: m["layers"][0].pop("head_dim"), r"missing field layers\[0\]\.head_dim"),
    (lambda m: m["inputs"].append(7), r"inputs\[\d+\]: expected an object"),
    (lambda m: m["files"].update(model="../../etc/passwd"), "field files"),
    (lambda m: m["kv_cache"].pop("past_key"), "field kv_cache"),
    (lambda m: m["kv_cache"].update(past_key="past"), "field kv_cache"),
    (lambda m: m["tokens"].update(eos="2"), "field tokens"),
    (lambda m: m["checksums"]["model.onnx"].update(bytes=-1), "field checksums"),
    (lambda m: m.update(dtype="float64"), "field dtype"),
    (lambda m: m.clear() or m.update(format="l4compile-build", format_version=1), "missing field"),
])
def test_edited_manifest(edit, message, build, capsys):
    edit_manifest(build, edit)
    with pytest.raises(BuildDirError, match=message):
        Engine.load(build)
    assert main(["run", str(build), "--prompt-ids", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: malformed manifest" in err


@pytest.mark.parametrize("text", ["", "[1, 2]", "{\"format\": 3}", "[" * 100000, "\xff\xfe"])
def test_manifest_that_is_not_one(text, build):
    (build / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(BuildDirError, match="manifest"):
        Engine.load(build)
