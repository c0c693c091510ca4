"""Global attention by blocks of queries, before / expected, then numerically with and without a cache; refusals."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.errors import PassError
from l4compile.ir import Graph, print_ir
from l4compile.passes import PassManager
from l4compile.passes.chunked_attention import GlobalAttentionBlocks
from tests.passes.conftest import run_onnx, run_torch
from tests.passes.test_chunked_attention import attention_feeds, inputs

BLOCK = 4


def before() -> Graph:
    g = Graph("attn")
    q, keys, positions, key_positions = inputs(g)
    mask = g.op("attention_mask", [positions, key_positions], name="mask", chunk_size=0)
    g.set_outputs([g.op("attention", [q, keys, keys, mask], name="l3.attention", scale=0.5)])
    return g


def expected() -> Graph:
    g = Graph("attn")
    q, keys, positions, key_positions = inputs(g)
    g.set_outputs([g.op("blocked_attention", [q, keys, keys, positions, key_positions], name="l3.blocked_attention",
                        block=BLOCK, scale=0.5)])
    return g


def test_before_expected():
    g = before()
    [(_, result)] = PassManager([GlobalAttentionBlocks(block=BLOCK)]).run(g)
    assert result.stats == {"layers": 1, "refused": 0}
    assert print_ir(g) == print_ir(expected())


# (absolute position of the first new token, cached positions, new positions): prefill in one block,
# in several blocks with a partial last one, decode, a multi-block step after a long cache
@pytest.mark.parametrize("past_length, cached, seq", [(0, 0, 3), (0, 0, 11), (9, 9, 1), (7, 7, 9), (5, 2, 6)])
def test_outputs_equal_the_masked_form(past_length, cached, seq):
    feeds = attention_feeds(past_length, cached, seq)
    g = before()
    want = run_torch(g, feeds)
    GlobalAttentionBlocks(block=BLOCK).run(g)
    for got in (run_torch(g, feeds), run_onnx(g, feeds)):
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)


def test_chunked_layers_are_not_its_business():
    g = before()
    next(n for n in g.nodes.values() if n.op == "attention_mask").attrs["chunk_size"] = 4
    assert GlobalAttentionBlocks().run(g).stats == {"layers": 0, "refused": 0}


def test_precondition_refused_when_layers_already_attend_by_blocks():
    g = before()
    PassManager([GlobalAttentionBlocks()]).run(g)
    with pytest.raises(PassError, match=r"pass global-attention-blocks refused: it requires global-attention-masked "
                                        r".* 1 layer\(s\) already attend by query blocks"):
        PassManager([GlobalAttentionBlocks()]).run(g)
