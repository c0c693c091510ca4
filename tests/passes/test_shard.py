"""The shard pass: what rank r's graph holds (before / expected), that the ranks together compute the
unsharded model (torch, all ranks in lockstep), and the splits it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from l4compile.build import BuildOptions, compile_graph
from l4compile.emit.torch_module import GraphModule
from l4compile.errors import PassError
from l4compile.passes.shard import Geometry, Shard, check_split
from l4compile.shard.reference import run_ranks_torch
from l4compile.weights import RandomWeights
from tests.conftest import load, token_ids

QUIET = lambda *_: None  # noqa: E731


def _rank(name: str, tp: int, rank: int, pipeline: str | None = None):
    options = BuildOptions(target="trt", pipeline=pipeline, tp=tp)
    return compile_graph(load(name), options, QUIET, rank=rank)[0]


def _feeds(graph, ids):
    feeds = {"input_ids": ids, "past_length": np.array(0), "logits_start": np.array(0)}
    for name in graph.inputs:
        if name.startswith(("past_key", "past_value")):
            feeds[name] = np.zeros((0, ids.shape[0]) + graph.values[name].type.shape[2:], np.float32)
    return feeds


def test_rank_graph_holds_its_heads_columns_and_experts():
    """tiny-maverick (4 heads, 1 KV head, 8 experts, dense FFN 128, expert FFN 32) at tp 2, rank 1."""
    g = _rank("tiny-maverick", 2, 1)
    shapes = {p.name: p.type.shape for p in g.params()}
    assert shapes["layers.0.self_attn.q_proj"] == (64, 32)          # 2 of 4 heads of 16
    assert shapes["layers.0.self_attn.k_proj"] == (64, 16)          # the one KV head, replicated
    assert shapes["layers.0.self_attn.o_proj"] == (32, 64)
    assert shapes["layers.0.feed_forward.gate_proj"] == (64, 64)    # dense layer 0: 128 / 2 columns
    assert shapes["layers.0.feed_forward.down_proj"] == (64, 64)
    assert shapes["layers.1.feed_forward.experts.gate_up_proj"] == (4, 64, 64)   # experts 4..7
    assert shapes["layers.1.feed_forward.shared_expert.up_proj"] == (64, 16)
    assert shapes["layers.1.feed_forward.router"] == (64, 8)        # replicated
    assert shapes["embed_tokens"] == (256, 64) and shapes["lm_head"] == (64, 256)
    q = next(p for p in g.params() if p.name == "layers.0.self_attn.q_proj")
    assert dict(q.derived.options) == {"axis": 1, "start": 32, "stop": 64} and q.derived.source.type.shape == (64, 64)
    dispatch = next(n for n in g.nodes.values() if n.op == "moe_dispatch")
    assert dispatch.attrs["expert_offset"] == 4
    assert g.values["past_key.0"].type.shape[2] == 1
    reduces = [n for n in g.nodes.values() if n.op == "all_reduce"]
    # one after each attention (o_proj) and one after each FFN (shared + routed summed first)
    assert sorted(n.inputs[0] for n in reduces) == sorted(
        [f"layers.{i}.self_attn.o" for i in range(4)] + ["layers.0.feed_forward.down", "layers.1.feed_forward.combine",
                                                         "layers.2.feed_forward.down", "layers.3.feed_forward.combine"])
    assert all(n.attrs["ranks"] == 2 for n in reduces)


def test_kv_heads_split_in_blocks_when_tp_divides_them():
    g = _rank("tiny-scout", 2, 1)   # 2 KV heads over 2 ranks
    k = next(p for p in g.params() if p.name == "layers.0.self_attn.k_proj")
    assert k.type.shape == (64, 16) and dict(k.derived.options)["start"] == 16


def test_tp_1_changes_nothing():
    g = compile_graph(load("tiny-scout"), BuildOptions(target="trt"), QUIET)[0]
    assert not Shard(1, 0).run(g).changed


@pytest.mark.parametrize("name,tp,pipeline", [("tiny-scout", 2, None), ("tiny-scout", 4, None),
                                              ("tiny-maverick", 4, None), ("tiny-maverick", 2, "none")])
def test_ranks_together_compute_the_unsharded_model(name, tp, pipeline):
    weights = RandomWeights(0)
    ids = token_ids(2, 11)
    options = BuildOptions(target="trt", pipeline=pipeline)
    full = compile_graph(load(name), options, QUIET)[0]
    with torch.no_grad():
        expected = GraphModule(full, weights)(*[torch.from_numpy(np.asarray(v)) for v in _feeds(full, ids).values()])
        ranks = [compile_graph(load(name), dataclasses.replace(options, tp=tp), QUIET, rank=r)[0] for r in range(tp)]
        outs = run_ranks_torch(ranks, weights, [_feeds(g, ids) for g in ranks])
    for out in outs:
        assert torch.allclose(out[0], expected[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tp,message", [(3, "4 attention heads do not split evenly over 3 ranks"),
                                        (8, "4 attention heads do not split evenly over 8 ranks")])
def test_refuses_a_split_that_is_not_exact(tp, message):
    with pytest.raises(PassError, match=message):
        _rank("tiny-scout", tp, 0)


def test_refuses_kv_heads_and_experts_that_do_not_divide():
    with pytest.raises(PassError, match="3 KV heads neither split"):
        check_split(Geometry(12, 3, 16), 2, {}, {})
    with pytest.raises(PassError, match="has 6 experts, not divisible by 4"):
        check_split(Geometry(8, 2, 16), 4, {}, {"layers.0.feed_forward.experts.gate_up_proj": 6})
    with pytest.raises(PassError, match="rank 2 of tp 2"):
        Shard(2, 2)
