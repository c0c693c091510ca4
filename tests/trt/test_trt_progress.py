"""Progress of `l4compile engine`: the compatibility check and the engine build are phases, TensorRT's own
phases nested in the engine's (through the fake `tensorrt`'s IProgressMonitor calls)."""

from __future__ import annotations

import json

import pytest

from l4compile.cli import main
from tests.trt import fakes


@pytest.fixture
def fake_trt(monkeypatch):
    return fakes.install(monkeypatch)


def test_engine_phases_and_json(fake_trt, trt_copy, capsys, monkeypatch):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    directory = trt_copy("tiny-maverick")
    assert main(["engine", str(directory), "--max-batch", "1", "--max-seq", "32", "--json", "-v"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["command"] == "engine" and report["trt"]["status"] == "built"
    phases = [(p["name"], p.get("within")) for p in report["phases"]]
    assert phases == [("compat check", None), ("engine", None), ("Building", "engine")]
    lines = err.splitlines()
    assert any(line.startswith("building TensorRT 10.15.1-fake engine") for line in lines)
    assert any(line.startswith("  Building ") and "2 steps" in line for line in lines)   # -v: TensorRT's phases
    assert any(line.startswith("engine ") for line in lines) and lines[-1].startswith("engine finished in ")
