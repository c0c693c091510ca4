"""The runtime: clear errors on bad input (engine stays usable), and no compiler or torch imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from l4compile.runtime import Engine, RuntimeInputError
from l4compile.runtime.errors import BuildDirError
from tests.text.conftest import text_build, text_checkpoint, tokenizer_dir  # noqa: F401  (fixtures)


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
    good = np.array([[1, 2]])
    np.testing.assert_array_equal(engine.logits(good), Engine.load(built_tiny("tiny-scout")).logits(good))


def test_loading_a_non_build_directory(tmp_path):
    with pytest.raises(BuildDirError, match="not a build directory"):
        Engine.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(BuildDirError, match="not valid JSON"):
        Engine.load(tmp_path)


def test_runtime_imports_without_compiler_torch_or_networkx(built_tiny):
    code = ("import sys; from l4compile.runtime import Engine; import numpy as np; "
            f"Engine.load({str(built_tiny('tiny-scout'))!r}).logits(np.array([[1, 2]])); "
            "bad = [m for m in ('torch', 'networkx', 'onnx', 'yaml', 'l4compile.ir', 'l4compile.spec', "
            "'tokenizers', 'jinja2') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"   # an ids-only app does not pay for the text libraries either


# what the runtime may import to speak text: numpy, onnxruntime, tokenizers, jinja2 (and their own imports)
TEXT_RUNTIME_MODULES = {"numpy", "onnxruntime", "tokenizers", "jinja2", "markupsafe", "l4compile"}


@pytest.mark.slow
def test_text_runtime_imports_only_numpy_onnxruntime_tokenizers_and_jinja2(text_build):
    build = text_build
    code = ("import sys; before = {m.split('.')[0] for m in sys.modules}; from l4compile.runtime import Engine; "
            f"e = Engine.load({str(build)!r}); e.complete('Hi', 2); e.chat([{{'role': 'user', 'content': 'x'}}], 2); "
            "list(e.chat_stream([{'role': 'user', 'content': 'x'}], 2)); e.generate_text(['a', 'bc'], 2); "
            "print(sorted({m.split('.')[0] for m in sys.modules} - before - set(sys.stdlib_module_names))); "
            "print(sorted(m for m in sys.modules if m.startswith('l4compile')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    imported = {m for m in eval(out[0]) if not m.startswith("_") and m != "cython_runtime"}   # C-extension internals
    assert imported <= TEXT_RUNTIME_MODULES, imported - TEXT_RUNTIME_MODULES
    assert {"tokenizers", "jinja2"} <= imported
    ours = set(eval(out[1])) - {"l4compile", "l4compile.errors"}   # the package and its error base class
    assert ours and all(m.startswith("l4compile.runtime") for m in ours), ours   # no compiler module
