"""The IR's verifier catches malformed graphs; the printer gives a stable text form."""

from __future__ import annotations

import pytest

from l4compile.errors import IRError
from l4compile.ir import Graph, TensorType, print_ir, verify
from l4compile.lower import lower
from l4compile.passes import DeadCodeElimination
from tests.conftest import load


def small_graph() -> Graph:
    g = Graph("small")
    x = g.add_input("x", TensorType("float32", ("batch", "seq", 4)))
    w = g.add_param("w", TensorType("float32", (4, 3)))
    y = g.op("linear", [x, w], name="proj")
    g.set_outputs([g.op("silu_mul", [y, y], name="act")])
    return g


def test_printer_is_stable_and_readable():
    assert print_ir(small_graph()) == "\n".join([
        "graph small(%x: float32[batch, seq, 4]) -> (%act: float32[batch, seq, 3]) {",
        "  param %w: float32[4, 3]",
        "  %proj = linear(%x, %w) : float32[batch, seq, 3]",
        "  %act = silu_mul(%proj, %proj) : float32[batch, seq, 3]",
        "}",
    ])
    spec = load("tiny-scout")
    assert print_ir(lower(spec)) == print_ir(lower(spec))


def test_shape_inference_rejects_mismatched_weight():
    g = Graph("bad")
    x = g.add_input("x", TensorType("float32", ("batch", 5)))
    w = g.add_param("w", TensorType("float32", (4, 3)))
    with pytest.raises(IRError, match="does not match weight"):
        g.op("linear", [x, w], name="proj")


def test_reading_an_undefined_value_is_an_error():
    g = small_graph()
    with pytest.raises(IRError, match="undefined value 'nope'"):
        g.op("add", ["proj", "nope"], name="sum")


def test_verifier_catches_dangling_value():
    g = small_graph()
    g.nodes["act"].inputs[1] = "ghost"
    with pytest.raises(IRError, match="dangling value 'ghost'"):
        verify(g)


def test_verifier_catches_stale_types():
    g = small_graph()
    g.values["proj"].type = TensorType("float32", ("batch", "seq", 7))
    with pytest.raises(IRError, match="records types"):
        verify(g)


def test_verifier_catches_cycles():
    g = small_graph()
    g.nx.add_edge("act", "proj")
    with pytest.raises(IRError, match="cycle"):
        verify(g)


def test_dead_code_elimination_removes_unread_nodes_and_params():
    g = small_graph()
    g.add_param("unused", TensorType("float32", (2,)))
    g.op("add", ["proj", "proj"], name="dead")
    result = DeadCodeElimination().run(g)
    assert result.changed and result.stats == {"nodes_removed": 1, "values_removed": 1}
    assert "dead" not in g.nodes and "unused" not in g.values
    verify(g)
    assert not DeadCodeElimination().run(g).changed


def graph_layers(name: str) -> int:
    return load(name).num_layers


@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick", "scout", "maverick", "behemoth"])
def test_lowered_graphs_verify(name):
    graph = lower(load(name))
    verify(graph)
    assert graph.outputs[0] == "logits"
    assert len(graph.outputs) == 1 + 2 * graph_layers(name)
