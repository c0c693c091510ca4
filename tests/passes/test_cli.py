"""The pass-related CLI: `l4compile passes`, --pipeline NAME|FILE, --disable-pass, --print-ir-after, --verify, -v."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import spec_path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], capture_output=True, text=True)


def test_passes_lists_passes_and_pipelines():
    r = cli("passes")
    assert r.returncode == 0, r.stderr
    for name in ("constant-fold", "cse", "dce", "moe-dispatch", "chunked-attention", "none", "onnx-cpu", "trt"):
        assert f"  {name} " in r.stdout
    assert "(default for --target onnx, ort-genai)" in r.stdout


def test_build_with_disabled_pass_printed_ir_verification_and_timings(tmp_path):
    # trt: its graph is lowered for the sequence-major cache, whose masked attention chunked-attention rewrites
    r = cli("build", spec_path("tiny-scout"), "--dry-run", "--pipeline", "trt", "--disable-pass", "moe-dispatch",
            "--print-ir-after", "chunked-attention", "--verify", "-v")
    assert r.returncode == 0, r.stderr
    err, out = r.stderr, r.stdout   # -v's per-pass lines are progress detail (stderr); the IR asked for is stdout's
    assert "pipeline trt: constant-fold(max_bytes=1048576), chunked-attention, cse" in err
    assert "chunked-attention" in err and "changed  layers=3 refused=0" in err
    ir = out[out.index("// IR after chunked-attention"):]
    assert "chunked_attention(" in ir and "moe_experts(" in ir and "moe_dispatch(" not in ir


def test_build_with_a_pipeline_file(tmp_path):
    path = tmp_path / "my-pipeline.yaml"
    path.write_text("passes:\n  - moe-dispatch: {impl: gather}\n  - dce\n")
    out = tmp_path / "m"
    r = cli("build", spec_path("tiny-maverick"), "--pipeline", path, "--weights", "random", "-o", out)
    assert r.returncode == 0, r.stderr
    assert '"pipeline": "my-pipeline"' in (out / "manifest.json").read_text()


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "onnx-cup"], "unknown pipeline 'onnx-cup' (did you mean 'onnx-cpu'?)"),
    (["--disable-pass", "moe-dispach"], "unknown pass to disable 'moe-dispach' (did you mean 'moe-dispatch'?)"),
    (["--print-ir-after", "chunked-atention"], "(did you mean 'chunked-attention'?)"),
    (["--pipeline", "none", "--print-ir-after", "dce"], "--print-ir-after dce: that pass does not run in pipeline none"),
])
def test_unknown_names_are_one_line_errors(args, message):
    r = cli("build", spec_path("tiny-scout"), "--dry-run", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr
