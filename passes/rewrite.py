"""Pattern rewrites as data: (pattern, replacement) pairs applied by one small matcher.

A pattern is a tree of `Pat(op, *inputs)` nodes whose leaves are `Var(name)`; it matches a
value produced by such a node. A `Var` binds any value, and a name used twice must bind the
same value. `bind` names a matched node so the replacement can read its attributes.

    moe = Pat("moe_experts", Var("x"), Pat("router_scores", Var("logits"), bind="scores"),
              Var("gate_up"), Var("down"))
    Rewrite("moe-dispatch", moe, lambda g, m: [g.op("moe_dispatch", [...], ...)])

The replacement builds new nodes and returns the values that replace the root's outputs
(same types); matched nodes that nothing reads any more are removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from l4compile.errors import IRError
from l4compile.ir.graph import Graph, Node


@dataclass(frozen=True)
class Var:
    """Matches any value and binds it to `name`."""

    name: str


@dataclass(frozen=True)
class Pat:
    """Matches a value produced by an `op` node whose inputs match `inputs` and whose attributes pass `attrs`."""

    op: str
    inputs: tuple[Any, ...] = ()
    bind: str | None = None
    attrs: Callable[[dict[str, Any]], bool] | None = None

    def __init__(self, op: str, *inputs: Any, bind: str | None = None,
                 attrs: Callable[[dict[str, Any]], bool] | None = None) -> None:
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "bind", bind)
        object.__setattr__(self, "attrs", attrs)


@dataclass
class Match:
    root: Node
    values: dict[str, str] = field(default_factory=dict)   # Var name -> value name
    nodes: dict[str, Node] = field(default_factory=dict)   # bind name -> node
    matched: list[Node] = field(default_factory=list)      # every node the pattern covered, root first


@dataclass(frozen=True)
class Rewrite:
    """`replace(graph, match)` returns the values replacing the root's outputs; `where(graph, match)`,
    if given, is a precondition on the whole match (a False leaves the match alone)."""

    name: str
    pattern: Pat
    replace: Callable[[Graph, Match], list[str]]
    where: Callable[[Graph, Match], bool] | None = None


def match(graph: Graph, pattern: Pat, node: Node) -> Match | None:
    """Match `pattern` rooted at `node`."""
    m = Match(node)
    return m if _match_node(graph, pattern, node, m) else None


def _match_node(graph: Graph, pat: Pat, node: Node, m: Match) -> bool:
    if node.op != pat.op or len(node.inputs) != len(pat.inputs):
        return False
    if pat.attrs is not None and not pat.attrs(node.attrs):
        return False
    m.matched.append(node)
    if pat.bind:
        m.nodes[pat.bind] = node
    return all(_match_value(graph, sub, value, m) for sub, value in zip(pat.inputs, node.inputs))


def _match_value(graph: Graph, pat: Any, value: str, m: Match) -> bool:
    if isinstance(pat, Var):
        bound = m.values.setdefault(pat.name, value)
        return bound == value
    producer = graph.values[value].producer
    return producer is not None and _match_node(graph, pat, graph.nodes[producer], m)


def apply_rewrites(graph: Graph, rules: list[Rewrite]) -> dict[str, int]:
    """Apply each rule once at every node that matches (in topological order); counts per rule.

    Also counts `<rule>.refused` for matches whose `where` precondition said no.
    """
    counts: dict[str, int] = {}
    for node in list(graph.topo_nodes()):
        if node.name not in graph.nodes:
            continue
        for rule in rules:
            m = match(graph, rule.pattern, node)
            if m is None:
                continue
            if rule.where is not None and not rule.where(graph, m):
                counts[f"{rule.name}.refused"] = counts.get(f"{rule.name}.refused", 0) + 1
                continue
            _replace(graph, rule, m)
            counts[rule.name] = counts.get(rule.name, 0) + 1
            break
    return counts


def _replace(graph: Graph, rule: Rewrite, m: Match) -> None:
    new = rule.replace(graph, m)
    if len(new) != len(m.root.outputs):
        raise IRError(f"rewrite {rule.name} gives {len(new)} values for {len(m.root.outputs)} outputs")
    for old, value in zip(m.root.outputs, new):
        if graph.type_of(old) != graph.type_of(value):
            raise IRError(f"rewrite {rule.name} replaces {old} ({graph.type_of(old)}) with {value} "
                          f"({graph.type_of(value)})")
        graph.replace_uses(old, value)
    removed = True
    while removed:  # a matched node is dead once its readers (matched nodes among them) are gone
        removed = False
        for node in m.matched:
            if node.name in graph.nodes and not any(graph.users(o) or o in graph.outputs for o in node.outputs):
                graph.remove_node(node.name)
                removed = True


def apply_rule(graph: Graph, rule: Rewrite, unit: str):
    """Apply one rule; a pass's result with stats {unit: rewrites, "refused": matches its `where` refused}."""
    from l4compile.passes.base import PassResult
    counts = apply_rewrites(graph, [rule])
    stats = {unit: counts.get(rule.name, 0), "refused": counts.get(f"{rule.name}.refused", 0)}
    return PassResult(stats[unit] > 0, stats)
