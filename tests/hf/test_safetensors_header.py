"""Safetensors headers are validated at least as strictly as the reference library (safetensors'
`Metadata::validate`): whatever it refuses, read_header refuses with one WeightError naming the file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4compile.errors import WeightError
from l4compile.hf.safetensors_io import TensorPlan, read_header, write_safetensors

SHAPES = {"a": (2, 3), "b": (4,), "c": (3, 2)}


def valid_file(path) -> bytes:
    plans = [TensorPlan(name, np.dtype("<f4"), shape) for name, shape in SHAPES.items()]
    write_safetensors(path, plans, lambda plan: np.ones(plan.shape, np.float32))
    return path.read_bytes()


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    blob = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + data


def reference_accepts(path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            list(f.keys())
        return True
    except Exception:
        return False


def ours(path) -> str | None:
    """None when read_header accepts; the message of its WeightError otherwise (anything else fails)."""
    try:
        read_header(path)
        return None
    except WeightError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return str(exc)


@pytest.fixture
def original(tmp_path):
    return split(valid_file(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["b"].update(data_offsets=[20, 36]), "overlaps tensor a"),
    (lambda h: h["b"].update(data_offsets=[28, 44]), "4 unused bytes before it"),
    (lambda h: h["a"].update(data_offsets=[8, 32]), "unused bytes before it"),
    (lambda h: h["a"].update(shape=[2**40, 2**40, 2**40]), "more than any file can hold"),
    (lambda h: h["a"].update(shape=[2, 3.0]), "corrupt header entry"),
    (lambda h: h["a"].update(shape=[2, -3]), "corrupt header entry"),
    (lambda h: h["a"].update(data_offsets=[0, 2**70]), "corrupt header entry"),
    (lambda h: h["a"].update(dtype="F7"), "unknown dtype"),
    (lambda h: h["a"].pop("shape"), "expected dtype, shape and data_offsets"),
    (lambda h: h.update(__metadata__={"format": 3}), "__metadata__ must map names to strings"),
    (lambda h: h.update(__metadata__=[1]), "__metadata__"),
])
def test_bad_headers(edit, message, original, tmp_path):
    header, data = original
    edit(header)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(join(header, data))
    assert not reference_accepts(path)
    with pytest.raises(WeightError, match=message):
        read_header(path)


def test_layout_must_cover_the_data_exactly(original, tmp_path):
    header, data = original
    path = tmp_path / "bad.safetensors"
    path.write_bytes(join(header, data + b"\0" * 8))
    assert not reference_accepts(path)
    with pytest.raises(WeightError, match="8 bytes after the last tensor"):
        read_header(path)
    path.write_bytes(join(header, data[:-4]))
    with pytest.raises(WeightError, match="tensor c in .*bad.safetensors: file is truncated"):
        read_header(path)


def test_duplicate_and_nested_keys(original, tmp_path):
    header, data = original
    text = json.dumps(header)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(join(text[:-1] + ', "a": ' + json.dumps(header["a"]) + "}", data))
    with pytest.raises(WeightError, match="given twice"):
        read_header(path)
    path.write_bytes(join("{" + '"x":' * 1 + "[" * 100000 + "]" * 100000 + "}", b""))
    with pytest.raises(WeightError, match="corrupt safetensors header"):
        read_header(path)


def test_valid_orders_are_accepted(original, tmp_path):
    """Entries may come in any order in the JSON (the reference sorts them by offset)."""
    header, data = original
    path = tmp_path / "ok.safetensors"
    path.write_bytes(join(dict(reversed(list(header.items()))), data))
    assert reference_accepts(path) and ours(path) is None
    header["a"]["extra"] = 1   # like the reference, unknown keys of an entry are ignored
    path.write_bytes(join(header, data))
    assert reference_accepts(path) and ours(path) is None


# ---- property-based: random damage, compared with the reference ------------------------------------

_NUMBERS = st.one_of(st.integers(-3, 64), st.integers(2**31 - 2, 2**31 + 2), st.integers(2**63 - 2, 2**64 + 2),
                     st.floats(allow_nan=True), st.just(True), st.text(max_size=3))
_VALUES = st.one_of(_NUMBERS, st.none(), st.lists(_NUMBERS, max_size=4),
                    st.dictionaries(st.text(max_size=4), _NUMBERS, max_size=2))


@st.composite
def damaged(draw, header: dict, data: bytes) -> bytes:
    header = json.loads(json.dumps(header))
    kind = draw(st.sampled_from(["offsets", "offset", "shape", "dim", "dtype", "entry", "metadata", "data",
                                 "length", "drop", "text"]))
    name = draw(st.sampled_from(sorted(SHAPES)))
    entry = header[name]
    if kind == "offsets":
        entry["data_offsets"] = draw(st.lists(_NUMBERS, max_size=3))
    elif kind == "offset":
        entry["data_offsets"][draw(st.integers(0, 1))] = draw(st.one_of(st.integers(0, 80), _NUMBERS))
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.one_of(st.integers(0, 8), _NUMBERS), max_size=5))
    elif kind == "dim":
        entry["shape"][0] = draw(st.one_of(st.integers(0, 12), _NUMBERS))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "f32", "F4", ""]))
    elif kind == "entry":
        header[name] = draw(_VALUES)
    elif kind == "metadata":
        header["__metadata__"] = draw(_VALUES)
    elif kind == "drop":
        del header[name]
    raw = join(header, data)
    if kind == "data":
        cut = draw(st.integers(-16, 16))
        raw = raw[:cut] if cut < 0 else raw + b"\0" * cut
    elif kind == "length":
        raw = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    elif kind == "text":
        at = draw(st.integers(8, len(raw) - 1))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at + 1:]
    return raw


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_are_refused_whenever_the_reference_refuses(data, tmp_path):
    path = tmp_path / "valid.safetensors"
    header, body = split(valid_file(path))
    raw = data.draw(damaged(header, body))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    result = ours(path)   # never a traceback: a WeightError naming the file, or acceptance
    if not reference_accepts(path):
        assert result is not None, raw[:200]
