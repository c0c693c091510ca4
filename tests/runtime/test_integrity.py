"""Corrupt builds: every fault is one BuildDirError naming the file; checksums catch same-size damage."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4compile.cli import main
from l4compile.runtime import Engine
from l4compile.runtime.errors import BuildDirError, RuntimeInputError
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


def test_an_unreadable_file_is_one_build_dir_error(build, monkeypatch, capsys):
    """Permissions (or a failing disk) while hashing: the file named, not an OSError from inside the check."""
    from l4compile.runtime import integrity

    def unreadable(path, on_bytes=None):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(integrity, "sha256_of", unreadable)
    with pytest.raises(BuildDirError, match=r"model\.onnx(\.data)?: cannot read it \(Permission denied\)"):
        Engine.load(build, verify=True)
    assert main(["verify", str(build)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read it (Permission denied)" in err


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


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(layers=[]), r"manifest\.json: malformed manifest: model\.onnx takes input 'past_key\.0'"),
    (lambda m: m["layers"][1].update(index=7),
     r"manifest\.json: malformed manifest: kv_cache\.past_key of layers\[7\] names 'past_key\.7', which model\.onnx"),
    (lambda m: m["kv_cache"].update(new_key="{i}"), r"kv_cache\.new_key of layers\[0\] names '0'"),
    (lambda m: m["kv_cache"].update(past_length=""), r"kv_cache\.past_length names ''"),
    (lambda m: m["layers"][0].update(num_kv_heads=1), r"model\.onnx: onnxruntime failed running the model \(.*past_key"),
    (lambda m: m["layers"][0].update(head_dim=3), r"model\.onnx: onnxruntime failed running the model"),
    (lambda m: m["layers"][0].update(kv_capacity=1), r"model\.onnx: onnxruntime failed running the model"),
    (lambda m: m["kv_cache"].update(in_place=False), r"model\.onnx: onnxruntime failed running the model"),
    (lambda m: m["tokens"].update(eos=[2**70]), "malformed manifest: field tokens"),
    (lambda m: m.update(vision=True), "malformed manifest: field vision"),
    (lambda m: m.update(sharding="x"), "malformed manifest: field sharding"),
    (lambda m: m.update(sharding={"tp": 2, "ranks": ["rank_0"]}), "malformed manifest: field sharding"),
])
def test_a_manifest_edited_to_disagree_with_its_model(edit, message, build, capfd):
    """Well-typed edits the schema cannot see: a name the model lacks is found at load; what only a run shows
    (a layer's heads, head size, capacity or layout) is onnxruntime's failure as one BuildDirError naming the
    model, with none of onnxruntime's own log lines."""
    edit_manifest(build, edit)
    with pytest.raises(BuildDirError, match=message):
        Engine.load(build).generate(np.array([[1, 2]]), max_new_tokens=2)
    assert main(["run", str(build), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 1
    captured = capfd.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("l4compile: error: "), captured.err
    assert "Traceback" not in captured.err and "onnxruntime_src" not in captured.err


@pytest.fixture(scope="module")
def sharded_build(tmp_path_factory):
    from l4compile.build import BuildOptions
    from l4compile.shard.build import build_sharded
    from l4compile.weights import RandomWeights
    from tests.conftest import load
    out = tmp_path_factory.mktemp("sharded") / "tp2"
    build_sharded(load("tiny-maverick"), out, RandomWeights(0), BuildOptions(target="trt", tp=2), None, lambda _: None)
    return out


@pytest.mark.parametrize("kind, edit, message", [
    ("vision", lambda m: m["vision"].update(input=""), r"malformed manifest: vision\.input names ''"),
    ("vision", lambda m: m["vision"].update(output="x"), r"malformed manifest: vision\.output names 'x'"),
    ("vision", lambda m: m["vision"].update(image_size=10**9), r"malformed manifest: vision: tiles of 3x1000000000"),
    ("vision", lambda m: m["vision"].update(files={}), "malformed manifest: field vision"),
    ("vision", lambda m: m["vision"].update(files=None), "has no vision model of its own"),
    ("sharded", lambda m: m.update(layers=[]), r"rank_0/segment.* takes 'past_key\.0'"),
    ("sharded", lambda m: m["layers"][0].update(num_kv_heads=7), r"layers\[0\]\.num_kv_heads is 7, but 2 ranks"),
    ("sharded", lambda m: m["kv_cache"].update(new_key="{i}"), r"the runtime reads '0'"),
    ("sharded", lambda m: m["kv_cache"].update(logits_start="x"), r"takes 'logits_start'"),
    ("sharded", lambda m: m["sharding"]["reductions"][0].append(["nowhere", "sum"]), r"sums 'nowhere'"),
    ("sharded", lambda m: m["sharding"].update(segments=[]), "malformed manifest: field sharding"),
])
def test_vision_and_sharded_manifests_edited_to_disagree(kind, edit, message, built_tiny, sharded_build, tmp_path):
    """The vision model's names and tile shape, and the segments of a sharded build, against their manifest."""
    build = tmp_path / "b"
    shutil.copytree(built_tiny("tiny-vision") if kind == "vision" else sharded_build, build)
    edit_manifest(build, edit)
    with pytest.raises(BuildDirError, match=message):
        Engine.load(build, backend="onnxruntime").generate(np.array([[1, 2]]), max_new_tokens=2)


def test_a_rank_of_a_sharded_build_on_onnxruntime_is_one_line(sharded_build):
    """A rank's graph holds TensorRT's collectives: onnxruntime cannot load it, and the build is not damaged."""
    for rank in (0, 1):
        with pytest.raises(BuildDirError, match=rf"rank_{rank}: rank {rank} of a sharded build: .* top directory"):
            Engine.load(sharded_build / f"rank_{rank}", backend="onnxruntime")


EDITS = st.one_of(st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 7, 2**63, 2**70, 1.5, math.nan, "", "x",
                                                          "../x", "{i}", "float64", "chunked"]),
                  st.just([]), st.just({}), st.just([1]), st.just({"a": 1}))


def paths_in(node, path=()):
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        yield from paths_in(value, path + (key,))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_of_the_manifest_runs_or_is_one_build_dir_error(data, build, built_tiny):
    """Property-based: one field of the manifest replaced by a value of any type, or deleted. Loading and
    generating either work or raise a one-line BuildDirError (RuntimeInputError where the edit changed what
    an input may be, e.g. the vocabulary); never another exception."""
    manifest = json.loads((built_tiny("tiny-scout") / "manifest.json").read_text())
    top = data.draw(st.sampled_from(sorted(set(manifest) - {"spec"})))   # each field alike, however large
    path = (top, *data.draw(st.sampled_from(list(paths_in(manifest[top])))))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(EDITS)
    (build / "manifest.json").write_text(json.dumps(manifest))
    try:
        Engine.load(build).generate(np.array([[1, 2]]), max_new_tokens=2)
    except (BuildDirError, RuntimeInputError) as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("text", ["", "[1, 2]", "{\"format\": 3}", "[" * 100000, "\xff\xfe"])
def test_manifest_that_is_not_one(text, build):
    (build / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(BuildDirError, match="manifest"):
        Engine.load(build)
