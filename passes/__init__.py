"""Optimization passes over the IR, and the manager that runs them as named pipelines."""

from l4compile.passes.base import Pass, PassManager, PassResult
from l4compile.passes.cleanup import DeadCodeElimination
from l4compile.passes.pipelines import PIPELINES, pipeline

__all__ = ["Pass", "PassManager", "PassResult", "DeadCodeElimination", "PIPELINES", "pipeline"]
