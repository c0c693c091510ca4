"""The runtime: clear errors on bad input (engine stays usable), and no compiler or torch imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from l4compile.runtime import Engine, RuntimeInputError
from l4compile.runtime.errors import BuildDirError


@pytest.mark.parametrize("ids, message", [
    (np.array([[1, 2, 256]]), "token id 256 is outside the vocabulary"),
    (np.array([[-1, 2]]), "token id -1 is outside"),
    (np.zeros((1, 0), dtype=np.int64), "non-empty"),
    (np.array([1, 2, 3]), "shape \\[batch, seq\\]"),
    (np.array([[1.0, 2.0]]), "must be integers"),
    (np.zeros((1, 4097), dtype=np.int64), "exceeds the model's maximum context 4096"),
])
def test_bad_input_is_a_clear_error_and_engine_stays_usable(ids, message, built_tiny):
    engine = Engine.load(built_tiny("tiny-scout"))
    with pytest.raises(RuntimeInputError, match=message):
        engine.logits(ids)
    assert engine.logits(np.array([[1, 2]])).shape == (1, 2, 256)


def test_loading_a_non_build_directory(tmp_path):
    with pytest.raises(BuildDirError, match="not a build directory"):
        Engine.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(BuildDirError, match="not valid JSON"):
        Engine.load(tmp_path)


def test_runtime_imports_without_compiler_torch_or_networkx(built_tiny):
    code = ("import sys; from l4compile.runtime import Engine; import numpy as np; "
            f"Engine.load({str(built_tiny('tiny-scout'))!r}).logits(np.array([[1, 2]])); "
            "bad = [m for m in ('torch', 'networkx', 'onnx', 'yaml', 'l4compile.ir', 'l4compile.spec') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
