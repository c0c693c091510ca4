"""Binding checkpoint tensors to IR parameters: layouts, dtypes, chunked mapped reads, and a one-line
WeightError naming the tensor and the file for every way a checkpoint can be broken."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from l4compile.errors import WeightError
from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
from l4compile.hf import safetensors_io
from l4compile.hf.safetensors_io import TensorPlan, read_header, read_mapped, write_safetensors
from l4compile.lower import lower
from tests.hf.conftest import causal_lm, edit_config, save

Q = "model.layers.0.self_attn.q_proj.weight"


def spec_of(checkpoint):
    config, file = load_hf_config(checkpoint)
    return spec_from_hf_config(config, "tiny", str(file))


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint that a test may break."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def rewrite(checkpoint, edit) -> None:
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})


def test_binds_every_parameter_transposed_to_ir_layout(checkpoint):
    spec = spec_of(checkpoint)
    source = HFCheckpoint.for_spec(checkpoint, spec)
    tensors = load_file(checkpoint / "model.safetensors")
    graph = lower(spec, kv_cache=False)
    q = source.get(graph.values["layers.0.self_attn.q_proj"])
    np.testing.assert_array_equal(q, tensors[Q].numpy().T)
    assert q.flags.c_contiguous and q.dtype == np.float32
    experts = source.get(graph.values["layers.1.feed_forward.experts.gate_up_proj"])
    np.testing.assert_array_equal(experts, tensors["model.layers.1.feed_forward.experts.gate_up_proj"].numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_converts_to_the_build_dtype(checkpoint, dtype):
    spec = spec_of(checkpoint)
    param = lower(spec, dtype, kv_cache=False).values["layers.0.self_attn.q_proj"]
    got = HFCheckpoint.for_spec(checkpoint, spec, dtype).get(param)
    want = load_file(checkpoint / "model.safetensors")[Q].numpy().T.astype(getattr(ml_dtypes, dtype, dtype))
    assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("transpose", [False, True])
def test_chunked_mapped_read_equals_a_whole_read(tmp_path, monkeypatch, transpose):
    """Chunks smaller than a row, of several rows, and an unaligned start all give the same array."""
    data = np.random.default_rng(0).standard_normal((37, 53)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "t.bin"
    path.write_bytes(b"x" * 4099 + data.tobytes())  # a start that is not page-aligned
    want = (data.T if transpose else data).astype(np.float32)
    for chunk in (2, 106 * 3, 10**6):
        monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", chunk)
        got = read_mapped(path, 4099, data.dtype, data.shape, np.dtype(np.float32), transpose)
        assert got.flags.c_contiguous and np.array_equal(got, want)


def test_writer_output_is_read_by_safetensors(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, dtype=ml_dtypes.bfloat16)}
    plans = [TensorPlan(name, a.dtype, a.shape) for name, a in arrays.items()]
    chunks = {"a": [arrays["a"][:1], arrays["a"][1:]], "b": arrays["b"]}   # chunks or whole arrays
    write_safetensors(tmp_path / "x.safetensors", plans, lambda plan: chunks[plan.name])
    loaded = load_file(tmp_path / "x.safetensors")
    assert torch.equal(loaded["a"], torch.from_numpy(arrays["a"]))
    assert loaded["b"].dtype == torch.bfloat16 and torch.equal(loaded["b"].float(), torch.ones(5))


BREAKAGES = {
    "missing": (lambda t: t.pop(Q), rf"missing tensor {Q} \(for parameter layers.0.self_attn.q_proj\): "
                                    r"not in .*model.safetensors"),
    "unexpected": (lambda t: t.update({"model.layers.9.self_attn.q_proj.weight": torch.zeros(2, 2)}),
                   r"unexpected tensor model.layers.9.self_attn.q_proj.weight in .*model.safetensors"),
    "wrong shape": (lambda t: t.update({Q: torch.zeros(32, 16)}),
                    rf"tensor {Q} in .*model.safetensors: shape \[32, 16\], the spec needs \[32, 32\]"),
    "integer dtype": (lambda t: t.update({Q: torch.zeros(32, 32, dtype=torch.int32)}),
                      rf"tensor {Q} in .*model.safetensors: dtype I32 is not supported"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_broken_tensor_is_named(checkpoint, case):
    edit, message = BREAKAGES[case]
    rewrite(checkpoint, edit)
    with pytest.raises(WeightError, match=message):
        HFCheckpoint.for_spec(checkpoint, spec_of(checkpoint))


def test_truncated_file_names_the_tensor_and_file(checkpoint):
    spec = spec_of(checkpoint)
    entries, _ = read_header(checkpoint / "model.safetensors")
    last = max(entries.values(), key=lambda e: e.start)
    with open(checkpoint / "model.safetensors", "r+b") as f:
        f.truncate(last.start + last.nbytes - 10)
    with pytest.raises(WeightError, match=rf"tensor {last.name} in .*model.safetensors: file is truncated"):
        HFCheckpoint.for_spec(checkpoint, spec)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:8] + b"#" * 20 + raw[28:], "corrupt safetensors header"),
    (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "corrupt or truncated safetensors file"),
    (lambda raw: raw[:5], "truncated safetensors file"),
])
def test_corrupt_header_names_the_file(checkpoint, damage, message):
    path = checkpoint / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightError, match=rf"model.safetensors: .*{message}"):
        HFCheckpoint(checkpoint)


def test_corrupt_header_entry_names_the_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"F32"', raw.index(Q.encode()))
    raw[at:at + 5] = b'"F16"'  # a dtype whose size does not match the entry's byte range
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightError, match=rf"tensor {Q} in .*model.safetensors: corrupt header entry"):
        HFCheckpoint(checkpoint)


@pytest.fixture
def sharded(tmp_path):
    return save(causal_lm(seed=2), tmp_path / "sharded", max_shard_size="40KB")


def test_sharded_index_errors(sharded):
    spec = spec_of(sharded)
    HFCheckpoint.for_spec(sharded, spec)  # intact: binds
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][Q]

    broken = dict(index, weight_map={**index["weight_map"], Q: "model-00099-of-00099.safetensors"})
    index_path.write_text(json.dumps(broken))
    with pytest.raises(WeightError, match=rf"tensor {Q}: shard .*model-00099-of-00099.safetensors .*does not exist"):
        HFCheckpoint(sharded)

    other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
    index_path.write_text(json.dumps(dict(index, weight_map={**index["weight_map"], Q: other})))
    with pytest.raises(WeightError, match=rf"tensor {Q}: listed in .* but not in .*{other}"):
        HFCheckpoint(sharded)

    index_path.write_text('{"weight_map": ')
    with pytest.raises(WeightError, match="model.safetensors.index.json: corrupt index"):
        HFCheckpoint(sharded)


def test_config_that_disagrees_with_the_spec_is_refused(checkpoint):
    spec = spec_of(checkpoint)
    edit_config(checkpoint, lambda c: c.update(use_qk_norm=False))
    with pytest.raises(WeightError, match="disagrees with the spec on attention.qk_norm: False in config.json"):
        HFCheckpoint.for_spec(checkpoint, spec)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_build_with_broken_checkpoint_is_one_line(checkpoint, tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    assert cli("import-hf", checkpoint, "-o", spec_file).returncode == 0
    rewrite(checkpoint, lambda t: t.update({Q: torch.zeros(32, 16)}))
    out = tmp_path / "build"
    r = cli("build", spec_file, "--weights", checkpoint, "-o", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert Q in r.stderr and "model.safetensors" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".build*"))


READ_PEAK = """
import resource, sys
import numpy as np
from l4compile.hf.safetensors_io import read_mapped
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = read_mapped(sys.argv[1], 0, np.dtype(np.float32), (4096, 16384), np.dtype(np.float32), transpose=True)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, out.nbytes)
"""


def test_mapped_read_peak_is_one_tensor_not_two(tmp_path):
    """A 256 MB tensor read (and transposed) adds about its own size to the peak RSS, not twice it:
    the mapped source pages are dropped chunk by chunk."""
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        row = np.ones(16384, dtype=np.float32)
        for _ in range(4096):
            f.write(row.tobytes())
    r = subprocess.run([sys.executable, "-c", READ_PEAK, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    added, size = map(int, r.stdout.split())
    assert added < size + 3 * safetensors_io.CHUNK_BYTES, (added, size)
