"""Named graph properties that passes require and ensure.

A property is a check that returns None when it holds, or a short reason why it does not.
The pass manager checks a pass's `requires` before it runs and its `ensures` after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from l4compile.errors import IRError
from l4compile.ir.graph import Graph


@dataclass(frozen=True)
class Property:
    name: str
    description: str
    check: Callable[[Graph], str | None]


PROPERTIES: dict[str, Property] = {}


def register_property(prop: Property) -> Property:
    PROPERTIES[prop.name] = prop
    return prop


def unmet(graph: Graph, names: tuple[str, ...]) -> str | None:
    """'name (description), which does not hold: why' for the first property that fails, else None."""
    for name in names:
        prop = PROPERTIES.get(name)
        if prop is None:
            raise IRError(f"unknown graph property {name!r}; known: {', '.join(PROPERTIES)}")
        why = prop.check(graph)
        if why is not None:
            return f"{name} ({prop.description}), which does not hold: {why}"
    return None


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _nodes_of(graph: Graph, op: str) -> list[str]:
    return [n.name for n in graph.nodes.values() if n.op == op]


def producer_op(graph: Graph, value: str) -> str | None:
    producer = graph.values[value].producer
    return graph.nodes[producer].op if producer is not None else None


def contiguous_positions(graph: Graph, q_pos: str, k_pos: str) -> bool:
    """Query positions are one ascending run and the keys' run ends where the queries' does.

    True by construction when the queries come from `positions` and the keys are those same
    positions or come from `key_positions` (cached positions, then the new ones).
    """
    return producer_op(graph, q_pos) == "positions" and (k_pos == q_pos or producer_op(graph, k_pos) == "key_positions")


def _masked_attention(graph: Graph, chunked: bool) -> list[str]:
    """Attention nodes reading a chunked (or global) attention_mask of contiguous positions."""
    found = []
    for node in graph.nodes.values():
        if node.op != "attention":
            continue
        mask = graph.values[node.inputs[3]].producer
        mask_node = graph.nodes.get(mask) if mask else None
        if mask_node is not None and mask_node.op == "attention_mask" \
                and bool(mask_node.attrs["chunk_size"]) == chunked and contiguous_positions(graph, *mask_node.inputs):
            found.append(node.name)
    return found


def _check_moe_unfused(graph: Graph) -> str | None:
    fused = _nodes_of(graph, "moe_dispatch")
    return f"{len(fused)} MoE block(s) are already dispatched ({_some(fused)})" if fused else None


def _check_moe_dispatched(graph: Graph) -> str | None:
    dense = [n.name for n in graph.nodes.values()
             if n.op == "moe_experts" and producer_op(graph, n.inputs[1]) == "router_scores"]
    return f"{len(dense)} MoE block(s) still compute every expert ({_some(dense)})" if dense else None


def _check_attention_masked(graph: Graph) -> str | None:
    blockwise = _nodes_of(graph, "chunked_attention")
    return f"{len(blockwise)} layer(s) already attend blockwise ({_some(blockwise)})" if blockwise else None


def _check_attention_blockwise(graph: Graph) -> str | None:
    masked = _masked_attention(graph, chunked=True)
    return f"{len(masked)} chunked layer(s) still attend through a [seq, seq] mask ({_some(masked)})" if masked else None


def _check_global_masked(graph: Graph) -> str | None:
    blocked = _nodes_of(graph, "blocked_attention")
    return f"{len(blocked)} layer(s) already attend by query blocks ({_some(blocked)})" if blocked else None


def _check_global_blocked(graph: Graph) -> str | None:
    masked = _masked_attention(graph, chunked=False)
    return f"{len(masked)} global layer(s) still attend through a [seq, seq] mask ({_some(masked)})" if masked else None


register_property(Property("moe-unfused", "MoE blocks in their lowered form: every expert computed, masked by "
                           "router_scores", _check_moe_unfused))
register_property(Property("moe-dispatched", "each token's MoE work touches only its selected experts",
                           _check_moe_dispatched))
register_property(Property("attention-masked", "chunked attention in its lowered form, through an explicit "
                           "[seq, seq] mask", _check_attention_masked))
register_property(Property("attention-blockwise", "chunked layers attend chunk by chunk, without a [seq, seq] mask",
                           _check_attention_blockwise))
register_property(Property("global-attention-masked", "global causal attention in its lowered form, through an "
                           "explicit [seq, seq] mask", _check_global_masked))
register_property(Property("global-attention-blocked", "global layers attend one block of queries at a time",
                           _check_global_blocked))
