"""The pattern matcher: (pattern, replacement) pairs, bound variables, preconditions, dead matched nodes."""

from __future__ import annotations

import pytest

from l4compile.errors import IRError
from l4compile.ir import Graph, TensorType, print_ir, verify
from l4compile.passes.rewrite import Pat, Rewrite, Var, apply_rewrites, match

F = TensorType("float32", ("n", 4))

# silu_mul(x, x) + x  ->  mul(x, x): nonsense arithmetic, but a small pattern with a variable used twice
PATTERN = Pat("add", Pat("silu_mul", Var("x"), Var("x"), bind="act"), Var("x"))


def graph_with(second_input: str) -> Graph:
    g = Graph("g")
    x = g.add_input("x", F)
    y = g.add_input("y", F)
    act = g.op("silu_mul", [x, x], name="act")
    g.set_outputs([g.op("add", [act, {"x": x, "y": y}[second_input]], name="sum")])
    return g


def to_mul(g, m):
    return [g.op("mul", [m.values["x"], m.values["x"]], name="product")]


def test_match_binds_variables_consistently():
    g = graph_with("x")
    m = match(g, PATTERN, g.nodes["sum"])
    assert m.values == {"x": "x"} and m.nodes["act"].name == "act"
    assert [n.name for n in m.matched] == ["sum", "act"]
    other = graph_with("y")
    assert match(other, PATTERN, other.nodes["sum"]) is None   # x and y are different values


def test_rewrite_replaces_the_root_and_removes_dead_matched_nodes():
    g = graph_with("x")
    assert apply_rewrites(g, [Rewrite("to-mul", PATTERN, to_mul)]) == {"to-mul": 1}
    verify(g)
    expected = Graph("g")
    x = expected.add_input("x", F)
    expected.add_input("y", F)
    expected.set_outputs([expected.op("mul", [x, x], name="product")])
    assert print_ir(g) == print_ir(expected)


def test_matched_nodes_that_others_still_read_stay():
    g = graph_with("x")
    g.set_outputs(["sum", "act"])
    apply_rewrites(g, [Rewrite("to-mul", PATTERN, to_mul)])
    assert "act" in g.nodes and "sum" not in g.nodes


def test_attribute_predicate_and_where_precondition():
    g = graph_with("x")
    never = Pat("add", Pat("silu_mul", Var("x"), Var("x"), attrs=lambda a: a.get("fast")), Var("x"))
    assert apply_rewrites(g, [Rewrite("never", never, to_mul)]) == {}
    refused = Rewrite("to-mul", PATTERN, to_mul, where=lambda graph, m: False)
    assert apply_rewrites(g, [refused]) == {"to-mul.refused": 1}
    assert "sum" in g.nodes


def test_a_replacement_must_keep_the_type():
    g = graph_with("x")
    wrong = Rewrite("wrong", PATTERN, lambda g, m: [g.op("cast", [m.values["x"]], name="c", dtype="float16")])
    with pytest.raises(IRError, match="rewrite wrong replaces sum"):
        apply_rewrites(g, [wrong])
