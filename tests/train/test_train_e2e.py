"""End to end: train a tiny model until it reproduces a fixed text, export-hf, build, and the ONNX engine's
greedy generation reproduces the text (and stops at eos)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l4compile.cli import main
from tests.train.conftest import train

TEXT = "l4compile trains llama 4 models."


@pytest.mark.slow
def test_memorized_text_survives_export_and_build(tmp_path, capsys):
    data = tmp_path / "fixed.jsonl"
    data.write_text("\n".join(json.dumps({"text": TEXT}) for _ in range(16)) + "\n")
    run = tmp_path / "run"
    # bos + 32 bytes + eos = 34 tokens: one document per sequence, crossing four chunks of 8
    assert train("--data", data, "--seq-len", 34, "--steps", 30, "--lr", "1e-2", "--eval-fraction", 0,
                 "-o", run) == 0
    assert main(["export-hf", str(run), "-o", str(tmp_path / "hf")]) == 0
    assert main(["build", str(run / "spec.yaml"), "--weights", str(tmp_path / "hf"), "-o", str(tmp_path / "build")]) == 0
    from l4compile.runtime import Engine
    engine = Engine.load(tmp_path / "build")
    prompt = [1] + list(TEXT[:4].encode())
    out = engine.generate(np.array([prompt]), max_new_tokens=40)[0].tolist()
    assert out[len(prompt):] == list(TEXT[4:].encode()) + [2]
