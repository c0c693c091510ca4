"""Sharded builds (build --tp N) run on CPU by the host-side reducer: the split is exact.

Tiny Scout- and Maverick-shaped specs at --tp 2 and 4: logits equal the unsharded build's within 1e-5,
greedy generation with the KV cache is token-identical across chunk boundaries (chunk 8) and the
temperature floor (4), and every rank's ONNX passes the static TensorRT check for 10.16.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from l4compile.build import BuildOptions, build
from l4compile.runtime import Engine
from l4compile.shard.build import build_sharded
from l4compile.trt.compat import check_file
from l4compile.weights import RandomWeights
from tests.conftest import load, token_ids
from tests.hf.conftest import tiny_checkpoint  # noqa: F401  (the fixture)

CASES = [("tiny-scout", 2), ("tiny-scout", 4), ("tiny-maverick", 2), ("tiny-maverick", 4)]
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for name in sorted({name for name, _ in CASES}):
        out[name, 1] = root / f"{name}-tp1"
        build(load(name), out[name, 1], RandomWeights(0), BuildOptions(target="trt"), log=QUIET)
    for name, tp in CASES:
        out[name, tp] = root / f"{name}-tp{tp}"
        build_sharded(load(name), out[name, tp], RandomWeights(0), BuildOptions(target="trt", tp=tp), None, QUIET)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,tp", CASES)
def test_logits_and_greedy_tokens_equal_the_unsharded_build(builds, name, tp):
    single, sharded = Engine.load(builds[name, 1]), Engine.load(builds[name, tp])
    ids = token_ids(2, 21, seed=tp)       # 21 tokens: two chunk boundaries in one prefill
    np.testing.assert_allclose(sharded.logits(ids), single.logits(ids), atol=1e-5, rtol=0)
    prompt = ids[:, :5]
    expected = single.generate(prompt, 27)   # decode crosses positions 8, 16, 24, 32 one token at a time
    assert np.array_equal(sharded.generate(prompt, 27), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name,tp", CASES)
def test_every_rank_passes_the_tensorrt_check_with_dist_collectives(builds, name, tp):
    manifest = json.loads((builds[name, tp] / "manifest.json").read_text())
    assert manifest["sharding"]["tp"] == tp and manifest["sharding"]["min_tensorrt"] == "10.16"
    for folder in manifest["sharding"]["ranks"]:
        report = check_file(builds[name, tp] / folder / "model.onnx")
        assert report.ok, report.problems
        assert report.min_tensorrt == "10.16" and report.op_counts["DistCollective"] == 8
        node = next(n for n in onnx.load(str(builds[name, tp] / folder / "model.onnx"), load_external_data=False)
                    .graph.node if n.op_type == "DistCollective")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"collective_operation": b"all_reduce", "reduce_op": b"sum", "root": -1, "group_size": 0,
                         "nb_rank": tp} and node.domain == ""


@pytest.mark.slow
def test_rank_weights_are_slices_of_the_full_tensors(builds):
    """Each rank's data file holds its slice of the unsharded weights, bit for bit."""
    from onnx import numpy_helper
    full = {t.name: numpy_helper.to_array(t, str(builds["tiny-scout", 1]))
            for t in onnx.load(str(builds["tiny-scout", 1] / "model.onnx")).graph.initializer}
    parts = [{t.name: numpy_helper.to_array(t, str(builds["tiny-scout", 2] / f"rank_{r}"))
              for t in onnx.load(str(builds["tiny-scout", 2] / f"rank_{r}" / "model.onnx")).graph.initializer}
             for r in range(2)]
    name = "layers.0.self_attn.o_proj"
    assert np.array_equal(np.concatenate([p[name] for p in parts], axis=0), full[name])
    name = "layers.2.feed_forward.experts.gate_up_proj"
    assert np.array_equal(np.concatenate([p[name] for p in parts], axis=0), full[name])
    assert np.array_equal(parts[1]["embed_tokens"], full["embed_tokens"])


@pytest.mark.slow
def test_a_checkpoint_streams_each_ranks_slice(tiny_checkpoint):
    """Rank slices of an HF checkpoint read only their bytes where the slice is a run of the stored
    tensor (experts, columns of transposed linears) and equal the whole tensor's slice everywhere."""
    from l4compile.hf import HFCheckpoint
    from l4compile.lower import lower
    from l4compile.passes.shard import Shard
    from tests.hf.test_hf_checkpoint import spec_of
    spec = spec_of(tiny_checkpoint)
    source = HFCheckpoint.for_spec(tiny_checkpoint, spec)
    graph = lower(spec)
    full = {p.name: p for p in graph.params()}
    Shard(2, 1).run(graph)
    from l4compile.weights.derived import with_derived
    weights = with_derived(source)
    for name in ("layers.0.feed_forward.experts.gate_up_proj", "layers.0.self_attn.q_proj",
                 "layers.0.self_attn.o_proj", "layers.0.feed_forward.shared_expert.down_proj"):
        part = graph.values[name]
        options = dict(part.derived.options)
        index = [slice(None)] * part.type.rank
        index[options["axis"]] = slice(options["start"], options["stop"])
        assert np.array_equal(weights.get(part), source.get(full[name])[tuple(index)])
