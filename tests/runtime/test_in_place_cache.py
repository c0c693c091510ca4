"""The in-place KV cache of onnx-cpu builds: per-row positions, long decodes across many chunk
boundaries, ragged batches; all against the torch reference's full forward (the straight lowering)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l4compile.emit.torch_module import GraphModule
from l4compile.lower import lower
from l4compile.runtime import Engine, RuntimeInputError
from l4compile.weights import RandomWeights
from tests.conftest import TINY_SPECS, load, token_ids


@pytest.fixture(scope="module")
def engines(built_tiny):
    return {name: Engine.load(built_tiny(name)) for name in TINY_SPECS}


@pytest.fixture(scope="module")
def reference():
    modules = {}

    def full_forward(name: str, ids: np.ndarray) -> np.ndarray:
        if name not in modules:
            modules[name] = GraphModule(lower(load(name), kv_cache=False), RandomWeights(0)).eval()
        with torch.no_grad():
            return modules[name](torch.from_numpy(ids)).numpy()
    return full_forward


def test_onnx_cpu_builds_cache_in_place(engines):
    kv = engines["tiny-scout"].manifest.kv_cache
    assert kv["in_place"] and kv["layout"] == ["batch", "kv_heads", "positions", "head_dim"]
    cache = engines["tiny-scout"].new_cache(batch=3, max_length=100)
    assert [layer.keys.shape for layer in cache.layers] == [(3, 2, 8, 16)] * 3 + [(3, 2, 100, 16)]


@pytest.mark.parametrize("name", TINY_SPECS)
def test_prefill_and_32_decode_steps_cross_many_chunks(name, engines, reference):
    """A 45-token prefill then 32 one-token steps (chunk 8: ten chunks, nine boundaries; temperature floor 4
    crossed many times): every logit equals the reference's full forward within 1e-4."""
    engine = engines[name]
    ids = token_ids(1, 77, seed=21)
    cache = engine.new_cache(batch=1, max_length=77)
    got = [engine.step(ids[:, :45], cache, logits_start=0)]
    got += [engine.step(ids[:, p:p + 1], cache, logits_start=0) for p in range(45, 77)]
    np.testing.assert_allclose(np.concatenate(got, axis=1), reference(name, ids), atol=1e-4, rtol=0)
    assert cache.length == 77


def test_caches_stepped_in_turn_each_equal_the_reference_and_logits_stay_as_returned(engines, reference):
    """The backend binds a cache's buffers once (per cache): two caches of different sizes stepped in turn on one
    engine, and a row view of a third, each get their own sequence's logits; a returned logits array is never
    written by a later step."""
    engine = engines["tiny-scout"]
    a, b = token_ids(1, 30, seed=3), token_ids(2, 20, seed=4)
    cache_a, cache_b = engine.new_cache(1, 30), engine.new_cache(2, 20)
    third = engine.new_cache(2, 30)
    got_a = [engine.step(a[:, :10], cache_a)]
    got_b = [engine.step(b[:, :1], cache_b)]
    got_third = [engine.step(a[:, :10], third.row(1))]
    kept = [got_a[0].copy(), got_b[0].copy()]
    for p in range(10, 20):
        got_a.append(engine.step(a[:, p:p + 1], cache_a))
        got_b.append(engine.step(b[:, p - 9:p - 8], cache_b))
        got_third.append(engine.step(a[:, p:p + 1], third.row(1)))
    np.testing.assert_array_equal(got_a[0], kept[0])
    np.testing.assert_array_equal(got_b[0], kept[1])
    np.testing.assert_allclose(np.concatenate(got_a, axis=1), reference("tiny-scout", a[:, :20]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.concatenate(got_b, axis=1), reference("tiny-scout", b[:, :11]), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.concatenate(got_third, axis=1), np.concatenate(got_a, axis=1))
    assert third.lengths.tolist() == [0, 20]


@pytest.mark.parametrize("name", TINY_SPECS)
def test_rows_at_different_positions_decode_together(name, engines, reference):
    """Rows of 5, 13 and 22 prompt tokens, each prefilled alone into its row, then 12 steps of all
    rows together (each at its own position, crossing chunk boundaries at different steps)."""
    engine = engines[name]
    lengths, steps = (5, 13, 22), 12
    seqs = [token_ids(1, n + steps, seed=n)[0] for n in lengths]
    cache = engine.new_cache(batch=3, max_length=max(lengths) + steps)
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        prefill = engine.step(seq[None, :n], cache.row(b), logits_start=0)
        np.testing.assert_allclose(prefill[0], reference(name, seq[None, :n])[0], atol=1e-4, rtol=0)
    assert cache.lengths.tolist() == list(lengths)
    got = [engine.step(np.array([[seq[n + i]] for seq, n in zip(seqs, lengths)]), cache, logits_start=0)[:, 0]
           for i in range(steps)]
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        want = reference(name, seq[None])[0, n:]
        np.testing.assert_allclose(np.stack([g[b] for g in got]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_generate_ragged_list_equals_each_prompt_alone(name, engines):
    engine = engines[name]
    prompts = [token_ids(1, n, seed=40 + n)[0] for n in (3, 11, 17)]
    out = engine.generate(prompts, max_new_tokens=20, stop_tokens=())
    assert isinstance(out, list) and [len(o) for o in out] == [23, 31, 37]
    for prompt, row in zip(prompts, out):
        np.testing.assert_array_equal(row, engine.generate(prompt[None], max_new_tokens=20, stop_tokens=())[0])


def test_generate_ragged_sampling_and_stop_tokens_per_row(engines):
    engine = engines["tiny-maverick"]
    prompts = [token_ids(1, n, seed=60 + n)[0] for n in (4, 9)]
    alone = [engine.generate(p[None], max_new_tokens=15, temperature=0.9, top_k=20, seed=3, stop_tokens=())[0]
             for p in prompts]
    stop = int(alone[1][9 + 4])   # the second row stops at its fifth new token, the first runs on
    out = engine.generate(prompts, max_new_tokens=15, temperature=0.9, top_k=20, seed=3, stop_tokens=(stop,))
    for a, row, n in zip(alone, out, (4, 9)):
        hits = np.nonzero(a[n:] == stop)[0]
        want = a[:n + hits[0] + 1] if len(hits) else a
        np.testing.assert_array_equal(row, want)
    assert len(out[1]) <= 9 + 5


def test_generate_ragged_on_a_sequence_major_build(tmp_path):
    """trt builds keep the sequence-major cache (one position per batch): a ragged list runs row by row."""
    from l4compile.build import BuildOptions, build
    build(load("tiny-scout"), tmp_path / "trt", RandomWeights(0), BuildOptions(target="trt"), log=lambda _: None)
    engine = Engine.load(tmp_path / "trt", backend="onnxruntime")
    assert not engine.manifest.kv_cache.get("in_place")
    prompts = [token_ids(1, n, seed=n)[0] for n in (3, 10)]
    out = engine.generate(prompts, max_new_tokens=6, stop_tokens=())
    for prompt, row in zip(prompts, out):
        np.testing.assert_array_equal(row, engine.generate(prompt[None], max_new_tokens=6, stop_tokens=())[0])
    with pytest.raises(RuntimeInputError, match="sequence-major"):
        engine.new_cache(2, 10).row(0)


def test_cache_beyond_available_memory_fails_in_one_line(engines, monkeypatch):
    from l4compile.runtime import kv_cache
    monkeypatch.setattr(kv_cache, "available_memory", lambda: 1 << 20)
    with pytest.raises(RuntimeInputError, match=r"needs .* GB .* only 0.00 GB of memory is available"):
        engines["tiny-scout"].new_cache(batch=1, max_length=4000)


def test_a_step_past_the_cache_is_refused(engines):
    engine = engines["tiny-scout"]
    cache = engine.new_cache(batch=1, max_length=10)
    engine.step(token_ids(1, 10), cache, logits_start=0)
    with pytest.raises(RuntimeInputError, match="exceed this cache"):
        engine.step(token_ids(1, 1), cache, logits_start=0)


def test_new_cache_refuses_an_empty_cache(engines):
    with pytest.raises(RuntimeInputError, match="batch must be >= 1"):
        engines["tiny-scout"].new_cache(batch=0, max_length=10)
    with pytest.raises(RuntimeInputError, match="max_length must be an integer"):
        engines["tiny-scout"].new_cache(batch=1, max_length=10.5)


def _decode_branch_taken(manifest, capacity: int, cached: int, chunk: int = 0) -> bool:
    """What the graph's If decides for one new token (ops_cache_attention: matmuls when capacity *
    MATMUL_READ_COST <= (cached + 1) * query heads per KV head and cached + 1 >= MIN_MATMUL_HISTORY)."""
    from l4compile.ir import ops_cache_attention as ops
    layer = manifest.layers[0]
    group = (layer.num_heads or layer.num_kv_heads) // layer.num_kv_heads
    longest = (cached % chunk if chunk else cached) + 1
    return capacity * ops.MATMUL_READ_COST <= longest * group and longest >= ops.MIN_MATMUL_HISTORY


@pytest.fixture(scope="module")
def short_history_matmuls(tmp_path_factory):
    """tiny-maverick built with the matmul branch's minimum history at 1 position (the default, 1024,
    is beyond the tiny specs' contexts): the branch then runs wherever the read cost favours it."""
    from l4compile.build import BuildOptions, build
    from l4compile.ir import ops_cache_attention
    out = tmp_path_factory.mktemp("builds") / "tiny-maverick-matmuls"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops_cache_attention, "MIN_MATMUL_HISTORY", 1)
        build(load("tiny-maverick"), out, RandomWeights(0), BuildOptions(), log=lambda _: None)
        yield Engine.load(out)


def test_the_matmul_branch_waits_for_a_long_history(engines):
    manifest = engines["tiny-maverick"].manifest
    assert not _decode_branch_taken(manifest, 100, 99)      # cheaper by reads, but a short history
    assert _decode_branch_taken(manifest, 2000, 1023) and not _decode_branch_taken(manifest, 2000, 1022)
    assert not _decode_branch_taken(manifest, 2100, 1023)   # a roomy cache: more to read than the re-reads


@pytest.mark.parametrize("rows", [1, 3])
def test_decode_by_matmuls_and_by_group_query_attention_both_equal_the_reference(rows, short_history_matmuls, reference,
                                                                                 monkeypatch):
    """tiny-maverick (4 query heads on 1 KV head) with the matmul branch allowed on short histories: with
    a tight cache the decode steps of the global layer and of the chunked layers past their third
    position read the buffers with matmuls; with a roomy cache every step runs GroupQueryAttention. Both
    equal the full forward within 1e-4."""
    from l4compile.ir import ops_cache_attention
    monkeypatch.setattr(ops_cache_attention, "MIN_MATMUL_HISTORY", 1)   # as the engine was built
    engine = short_history_matmuls
    lengths = (30, 37, 24)[:rows]
    steps = 10
    seqs = [token_ids(1, n + steps, seed=70 + n)[0] for n in lengths]
    tight = max(lengths) + steps
    assert _decode_branch_taken(engine.manifest, tight, min(lengths))          # the global layer, first step
    assert _decode_branch_taken(engine.manifest, 8, 3) and not _decode_branch_taken(engine.manifest, 8, 2)
    assert not _decode_branch_taken(engine.manifest, 4 * tight, max(lengths) + steps)
    caches = []
    for capacity in (tight, 4 * tight):
        cache = engine.new_cache(batch=rows, max_length=capacity)
        caches.append(cache)
        for b, (seq, n) in enumerate(zip(seqs, lengths)):
            engine.step(seq[None, :n], cache.row(b), logits_start=0)
        got = [engine.step(np.array([[seq[n + i]] for seq, n in zip(seqs, lengths)]), cache, logits_start=0)[:, 0]
               for i in range(steps)]
        for b, (seq, n) in enumerate(zip(seqs, lengths)):
            np.testing.assert_allclose(np.stack([g[b] for g in got]), reference("tiny-maverick", seq[None])[0, n:],
                                       atol=1e-4, rtol=0, err_msg=f"capacity {capacity}, row {b}")
        assert cache.lengths.tolist() == [n + steps for n in lengths]
    # ScatterND wrote each new position where GroupQueryAttention writes it
    for by_matmuls, by_gqa in zip(caches[0].layers, caches[1].layers):
        for b, n in enumerate(lengths):
            held = min(by_matmuls.keys.shape[2], n + steps)
            if by_matmuls.chunk:
                held = (n + steps) % by_matmuls.chunk or by_matmuls.chunk
            for got, want in ((by_matmuls.keys, by_gqa.keys), (by_matmuls.values, by_gqa.values)):
                np.testing.assert_array_equal(got[b, :, :held], want[b, :, :held])


def test_float32_builds_choose_between_matmuls_and_group_query_attention(built_tiny):
    import onnx
    model = onnx.load(str(built_tiny("tiny-maverick") / "model.onnx"), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"
           and any(o.startswith("present_key.") for o in n.output)]
    assert len(ifs) == 4   # every layer's attention
    for node in ifs:
        branches = {a.name: {n.op_type for n in a.g.node} for a in node.attribute}
        assert {"ScatterND", "FusedMatMul", "Softmax"} <= branches["then_branch"]
        assert branches["else_branch"] == {"GroupQueryAttention"}
