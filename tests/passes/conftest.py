"""Fixtures of the pass tests: tiny specs built with each pipeline (once per session), and small graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from l4compile.emit.onnx_emitter import emit_onnx
from l4compile.ir import Graph

PIPELINES = ("none", "onnx-cpu", "trt")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(spec name, pipeline or pipeline file) -> build directory, random weights seed 0."""
    from l4compile.build import BuildOptions, build
    from l4compile.weights import RandomWeights
    from tests.conftest import load
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, pipeline: str) -> Path:
        if (name, pipeline) not in cache:
            out = tmp_path_factory.mktemp("pass-builds") / f"{name}-{Path(pipeline).stem}"
            build(load(name), out, RandomWeights(0), BuildOptions(pipeline=pipeline), log=lambda _: None)
            cache[name, pipeline] = out
        return cache[name, pipeline]
    return get


def run_onnx(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A small graph (inputs, consts and no params) through onnxruntime."""
    model = emit_onnx(graph, None, None).model
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_torch(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The same graph through each op's torch reference."""
    from l4compile.ir.op import get_op
    env = {k: torch.from_numpy(v) for k, v in feeds.items()}
    env.update({c.name: torch.from_numpy(np.asarray(c.data)) for c in graph.consts()})
    for node in graph.topo_nodes():
        env.update(zip(node.outputs, get_op(node.op).torch(torch, [env[v] for v in node.inputs], node.attrs)))
    return [env[o].numpy() for o in graph.outputs]
