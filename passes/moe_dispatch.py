"""MoE dispatch fusion: every expert on every token becomes each token on its own experts."""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.errors import PassError
from l4compile.ir.graph import Graph
from l4compile.ir.ops_moe_dispatch import IMPLS
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.rewrite import Match, Pat, Rewrite, Var, apply_rewrites

# The lowered MoE block: router scores (top-k, sigmoid) masking a run of every expert.
UNFUSED_MOE = Pat("moe_experts", Var("x"), Pat("router_scores", Var("logits"), bind="scores"),
                  Var("gate_up"), Var("down"), bind="experts")


@dataclass
class MoEDispatch(Pass):
    """Rewrite `moe_experts(x, router_scores(logits))` into `moe_dispatch(x, logits)`.

    impl: how moe_dispatch is lowered (see l4compile.ir.ops_moe_dispatch): "grouped" (standard ops,
    any token count), "gather" (standard ops, decode), "auto" (an If between them at
    gather_max_tokens), or "ort" (onnxruntime's MoE contrib op; top-1 blocks only, others fall
    back to "grouped" and are counted in the stats).
    """

    impl: str = "grouped"
    gather_max_tokens: int = 8
    # impl "ort": split each expert into up to this many parts (a power of two dividing its inner
    # size) so that onnxruntime's threads share a token's expert (see ops_moe_dispatch._ort_moe).
    ort_parts: int = 1

    name = "moe-dispatch"
    description = "run each token through its selected experts only, not every expert (MoE dispatch fusion)"
    requires = ("moe-unfused",)
    ensures = ("moe-dispatched",)

    def __post_init__(self) -> None:
        if not isinstance(self.ort_parts, int) or self.ort_parts < 1:
            raise PassError(f"pass {self.name}: ort_parts must be a positive integer, got {self.ort_parts!r}")
        if self.impl not in IMPLS:
            raise PassError(f"pass {self.name}: impl {self.impl!r} is not one of {', '.join(IMPLS)}")

    def run(self, graph: Graph) -> PassResult:
        self._fallbacks = 0
        counts = apply_rewrites(graph, [Rewrite(self.name, UNFUSED_MOE, self._dispatch)])
        stats = {"blocks": counts.get(self.name, 0)}
        if self.impl == "ort":
            stats["fallback_grouped"] = self._fallbacks
        return PassResult(stats["blocks"] > 0, stats)

    def _dispatch(self, graph: Graph, m: Match) -> list[str]:
        top_k = m.nodes["scores"].attrs["top_k"]
        impl = self.impl
        if impl == "ort" and top_k != 1:
            impl = "grouped"
            self._fallbacks += 1
        block = m.nodes["experts"].name.rsplit(".", 1)[0]
        inputs = [m.values["x"], m.values["logits"], m.values["gate_up"], m.values["down"]]
        return [graph.op("moe_dispatch", inputs, name=f"{block}.dispatch", top_k=top_k, impl=impl,
                         gather_max_tokens=self.gather_max_tokens,
                         **({"ort_parts": self.ort_parts} if impl == "ort" and self.ort_parts > 1 else {}))]
