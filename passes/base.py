"""The pass contract and the manager that runs a pipeline.

A pass is a small object: a `name`, its options as constructor arguments (passes are
dataclasses, so `options` is their fields), and `run(graph) -> PassResult`. It may declare
graph properties (see `l4compile.passes.properties`) it `requires` before it runs and
`ensures` after; the manager checks both, verifies the graph after each pass when asked,
and times every pass.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from l4compile.errors import IRError, PassError
from l4compile.ir.graph import Graph
from l4compile.ir.verify import verify
from l4compile.passes.properties import unmet


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None   # why the pass did not run: a precondition that does not hold


class Pass(ABC):
    """Subclasses are dataclasses whose fields are the pass's options."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""          # one line, for `l4compile passes`
    requires: ClassVar[tuple[str, ...]] = ()  # properties that must hold before the pass runs
    ensures: ClassVar[tuple[str, ...]] = ()   # properties that hold after it ran

    @property
    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) \
            else {}

    @abstractmethod
    def run(self, graph: Graph) -> PassResult:
        """Rewrite `graph` in place."""

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


class PassManager:
    """Runs passes in order.

    A precondition (`requires`) that does not hold refuses the pass: a PassError naming the pass,
    the property and why, or with `on_unmet="skip"` a result that says it was skipped. An
    `ensures` that does not hold afterwards is a bug in the pass (IRError). With `verify_each`,
    the IR verifier runs after every pass; `after_pass` sees each pass, the graph and the result.
    """

    def __init__(self, passes: list[Pass], verify_each: bool = True, on_unmet: str = "error",
                 after_pass: Callable[[Pass, Graph, PassResult], None] | None = None) -> None:
        if on_unmet not in ("error", "skip"):
            raise ValueError(f"on_unmet must be 'error' or 'skip', got {on_unmet!r}")
        self.passes = passes
        self.verify_each = verify_each
        self.on_unmet = on_unmet
        self.after_pass = after_pass

    def run(self, graph: Graph) -> list[tuple[str, PassResult]]:
        results = []
        for p in self.passes:
            start = time.perf_counter()
            reason = unmet(graph, p.requires)
            if reason is not None:
                if self.on_unmet == "error":
                    raise PassError(f"pass {p.name} refused: it requires {reason}")
                result = PassResult(False, skipped=f"requires {reason}")
            else:
                result = p.run(graph)
                broken = unmet(graph, p.ensures)
                if broken is not None:
                    raise IRError(f"pass {p.name} promised {broken}")
            result.seconds = time.perf_counter() - start
            if self.verify_each:
                verify(graph)
            if self.after_pass:
                self.after_pass(p, graph, result)
            results.append((p.name, result))
        return results


def format_result(name: str, result: PassResult) -> str:
    """One line per pass for -v: time, changed / unchanged / skipped, and the stats."""
    state = f"skipped ({result.skipped})" if result.skipped else ("changed" if result.changed else "unchanged")
    stats = " ".join(f"{k}={v}" for k, v in result.stats.items())
    return f"  {name:<24} {result.seconds * 1e3:8.1f} ms  {state}{'  ' + stats if stats else ''}"
