"""Named pipelines per target. A pipeline is a plain list of passes."""

from __future__ import annotations

from typing import Callable

from l4compile.errors import BuildError
from l4compile.passes.base import Pass
from l4compile.passes.cleanup import DeadCodeElimination

PIPELINES: dict[str, Callable[[], list[Pass]]] = {
    "none": lambda: [],
    "onnx-cpu": lambda: [DeadCodeElimination()],
}
DEFAULT_PIPELINE = {"onnx": "onnx-cpu", "trt": "onnx-cpu"}


def pipeline(name: str) -> list[Pass]:
    try:
        return PIPELINES[name]()
    except KeyError:
        raise BuildError(f"unknown pipeline {name!r}; known: {', '.join(sorted(PIPELINES))}") from None
