"""One focused test per semantic detail of LLAMA4.md."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from l4compile.emit.torch_module import GraphModule
from l4compile.ir.op import get_op
from l4compile.lower import lower
from l4compile.weights import RandomWeights
from tests.conftest import load, token_ids


def run_op(name: str, *inputs, **attrs):
    return get_op(name).torch(torch, list(inputs), attrs)


def test_router_score_is_sigmoid_of_top1_logit_and_zero_elsewhere():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    (scores,) = run_op("router_scores", logits, top_k=1)
    torch.testing.assert_close(scores, torch.tensor([[0.0, 1 / (1 + math.exp(-2.0)), 0.0, 0.0]]))


def test_router_scales_expert_input_not_output():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8)
    scores = torch.zeros(1, 3, 2)
    scores[0, :, 1] = torch.tensor([0.2, 0.5, 0.9])
    gate_up, down = torch.randn(2, 8, 12), torch.randn(2, 6, 8)
    (got,) = run_op("moe_experts", x, scores, gate_up, down)

    def expert(e, h):
        gate, up = (h @ gate_up[e]).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ down[e]
    s = scores[0, :, 1:2]
    torch.testing.assert_close(got[0], expert(1, x[0] * s))
    assert not torch.allclose(got[0], s * expert(1, x[0]), atol=1e-3)


def test_unselected_experts_contribute_nothing():
    x = torch.randn(1, 2, 8)
    scores = torch.tensor([[[0.7, 0.0], [0.0, 0.3]]])
    gate_up, down = torch.randn(2, 8, 12), torch.randn(2, 6, 8)
    (both,) = run_op("moe_experts", x, scores, gate_up, down)
    (first_only,) = run_op("moe_experts", x[:, :1], scores[:, :1, :1], gate_up[:1], down[:1])
    torch.testing.assert_close(both[:, :1], first_only)


def test_temperature_scale_values():
    positions = torch.arange(20)[None]
    (scale,) = run_op("temperature_scale", positions, attn_scale=0.1, floor_scale=4)
    want = [1 + 0.1 * math.log(1 + math.floor((p + 1) / 4)) for p in range(20)]
    torch.testing.assert_close(scale.flatten(), torch.tensor(want))
    assert scale.flatten()[2] == 1.0 and scale.flatten()[3] > 1.0  # the floor: first step at p + 1 == floor_scale


def test_chunked_mask_blocks_previous_chunk_global_mask_does_not():
    positions = torch.arange(12)[None]
    (chunked,) = run_op("attention_mask", positions, positions, chunk_size=8)
    (global_,) = run_op("attention_mask", positions, positions, chunk_size=0)
    assert chunked[0, 0, 9, 7] == -math.inf and global_[0, 0, 9, 7] == 0
    assert chunked[0, 0, 9, 8] == 0 and chunked[0, 0, 7, 0] == 0
    assert chunked[0, 0, 3, 4] == -math.inf and global_[0, 0, 3, 4] == -math.inf  # causal in both


def test_rope_is_interleaved_pairs_as_complex_rotation():
    x = torch.randn(1, 3, 1, 4)
    inv_freq = torch.tensor([1.0, 0.01])
    cos, sin = run_op("rope_angles", torch.arange(3)[None], inv_freq)
    (got,) = run_op("rope", x, cos, sin)
    angles = torch.arange(3)[:, None].float() * inv_freq
    want = torch.view_as_real(torch.view_as_complex(x.reshape(1, 3, 1, 2, 2)) * torch.polar(torch.ones_like(angles), angles)[None, :, None, :])
    torch.testing.assert_close(got, want.flatten(3))


def test_llama3_rope_scaling_matches_transformers():
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from l4compile.rope import inv_freq
    spec = load("tiny-scout")
    sc = spec.attention.rope.scaling
    config = Llama4TextConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=4, rope_parameters={
        "rope_type": "llama3", "rope_theta": spec.attention.rope.theta, "factor": sc.factor,
        "low_freq_factor": sc.low_freq_factor, "high_freq_factor": sc.high_freq_factor,
        "original_max_position_embeddings": sc.original_max_position_embeddings})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    np.testing.assert_allclose(inv_freq(spec.attention.rope, 16), want.numpy(), rtol=1e-6)
    assert not np.allclose(inv_freq(dataclasses.replace(spec.attention.rope, scaling=None), 16), want.numpy())


def _ops_by_layer(graph, op):
    return sorted({int(n.name.split(".")[1]) for n in graph.nodes.values() if n.op == op and n.name.startswith("layers.")})


def test_layer_pattern_in_the_graph():
    scout, maverick = lower(load("tiny-scout")), lower(load("tiny-maverick"))
    assert _ops_by_layer(scout, "moe_experts") == [0, 1, 2, 3]
    assert _ops_by_layer(maverick, "moe_experts") == [1, 3]
    assert _ops_by_layer(scout, "rope") == [0, 1, 2] == _ops_by_layer(maverick, "rope")
    assert _ops_by_layer(scout, "l2_norm") == [0, 1, 2]          # qk norm on RoPE layers only
    assert _ops_by_layer(maverick, "l2_norm") == []              # Maverick has no qk norm
    assert _ops_by_layer(scout, "mul") == [3]                    # temperature tuning on the NoPE layer
    masks = {n.attrs["chunk_size"] for n in scout.nodes.values() if n.op == "attention_mask"}
    assert masks == {0, 8}                                       # one mask per kind, shared by the layers


def _logits(spec, ids):
    with torch.no_grad():
        return GraphModule(lower(spec, kv_cache=False), RandomWeights(0))(torch.from_numpy(ids)).numpy()


@pytest.mark.parametrize("nope_layers, crosses", [((), False), ((3,), True)])
def test_only_nope_layers_see_across_chunks(nope_layers, crosses):
    spec = dataclasses.replace(load("tiny-scout"), nope_layers=nope_layers)
    ids = token_ids(1, 16)
    changed = ids.copy()
    changed[0, 0] = (ids[0, 0] + 1) % 256                     # a token in the first chunk
    a, b = _logits(spec, ids), _logits(spec, changed)
    assert not np.allclose(a[0, :8], b[0, :8])               # same chunk: always visible
    assert (not np.array_equal(a[0, 8:], b[0, 8:])) == crosses


def test_tied_embeddings_reuse_the_input_table():
    spec = dataclasses.replace(load("tiny-maverick"), tie_word_embeddings=True)
    graph = lower(spec)
    assert "lm_head" not in {p.name for p in graph.params()}
    assert graph.nodes["logits"].inputs[1] == "embed_tokens" and graph.nodes["logits"].attrs["transpose_weight"]
