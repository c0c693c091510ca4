"""Fixtures of the TensorRT target: TensorRT-ready builds of the tiny specs, made without TensorRT."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import load

NO_TRT = "tensorrt is not installed"


@pytest.fixture(scope="session")
def trt_built(tmp_path_factory):
    """name -> a `--target trt` build directory of that tiny spec (random weights, seed 0), engine pending."""
    from l4compile.build import BuildOptions, build
    from l4compile.trt import builder
    from l4compile.weights import RandomWeights
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("trt-builds") / name
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(builder, "unavailable_reason", lambda: NO_TRT)
                build(load(name), out, RandomWeights(0), BuildOptions(target="trt"), log=lambda _: None)
            cache[name] = out
        return cache[name]
    return get


@pytest.fixture
def trt_copy(trt_built, tmp_path):
    """name -> a private copy of a `--target trt` build (tests that write into it)."""
    def get(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(trt_built(name), out)
        return out
    return get
