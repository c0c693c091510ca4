"""The pass contract: a named object whose run(graph) says whether it changed anything."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from l4compile.ir.graph import Graph
from l4compile.ir.verify import verify


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Pass(ABC):
    name: str = ""

    @abstractmethod
    def run(self, graph: Graph) -> PassResult:
        """Rewrite `graph` in place."""


class PassManager:
    """Runs passes in order; verifies the graph after each one when asked."""

    def __init__(self, passes: list[Pass], verify_each: bool = True,
                 after_pass: Callable[[Pass, Graph, PassResult], None] | None = None) -> None:
        self.passes = passes
        self.verify_each = verify_each
        self.after_pass = after_pass

    def run(self, graph: Graph) -> list[tuple[str, PassResult]]:
        results = []
        for p in self.passes:
            start = time.perf_counter()
            result = p.run(graph)
            result.seconds = time.perf_counter() - start
            if self.verify_each:
                verify(graph)
            if self.after_pass:
                self.after_pass(p, graph, result)
            results.append((p.name, result))
        return results
