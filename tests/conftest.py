"""Shared fixtures: tiny specs, their IR graphs, and built directories (built once per session)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Ctrl-C and SIGINT tests need the programs they start to take SIGINT as usual. A shell starts a background job
# (`bash .ci/run &`) with SIGINT ignored, an ignored signal stays ignored across fork and exec, and Python then
# leaves KeyboardInterrupt out: the tests' REPLs and builds would never see the Ctrl-C (a pty test waited
# forever). A handled signal is reset to the default at exec, so handling it here gives every child the default.
signal.signal(signal.SIGINT, signal.default_int_handler)
SPECS = ROOT / "specs"
TINY_SPECS = ("tiny-scout", "tiny-maverick")
# chunk_size is 8 and floor_scale 4 in both tiny specs: below, equal to and several times the chunk,
# all past the first temperature floor step (p + 1 >= 4), one past several steps.
SEQ_LENS = (5, 8, 24, 41)

# Progress lines of a command's first INTERVAL seconds are held (l4compile.progress): on a busy test
# machine a quick command can take more than the default 5 s, and its error must still be its one line.
# Tests of progress output set their own interval.
os.environ.setdefault("L4COMPILE_PROGRESS_INTERVAL", "120")


def spec_path(name: str) -> Path:
    return SPECS / f"{name}.yaml"


def load(name: str):
    from l4compile.spec import load_spec
    return load_spec(spec_path(name))


def token_ids(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)


@pytest.fixture(scope="session")
def built_tiny(tmp_path_factory):
    """name -> build directory of that tiny spec with random weights (seed 0)."""
    from l4compile.build import BuildOptions, build
    from l4compile.weights import RandomWeights
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("builds") / name
            build(load(name), out, RandomWeights(0), BuildOptions(), log=lambda _: None)
            cache[name] = out
        return cache[name]
    return get


@pytest.fixture(scope="session")
def torch_reference():
    """name -> the torch module of that tiny spec's straight lowering (random weights, seed 0): the reference
    the builds are held to."""
    from l4compile.emit.torch_module import GraphModule
    from l4compile.lower import lower
    from l4compile.weights import RandomWeights
    modules = {}

    def get(name: str):
        if name not in modules:
            modules[name] = GraphModule(lower(load(name), kv_cache=False), RandomWeights(0)).eval()
        return modules[name]
    return get
