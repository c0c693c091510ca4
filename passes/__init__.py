"""Optimization passes over the IR, and the manager that runs them as named pipelines."""

from l4compile.passes.base import Pass, PassManager, PassResult
from l4compile.passes.cleanup import CommonSubexpressionElimination, ConstantFolding, DeadCodeElimination
from l4compile.passes.pipelines import PASSES, PIPELINES, load_pipeline, make_pass, pipeline

__all__ = ["Pass", "PassManager", "PassResult", "CommonSubexpressionElimination", "ConstantFolding",
           "DeadCodeElimination", "PASSES", "PIPELINES", "load_pipeline", "make_pass", "pipeline"]
