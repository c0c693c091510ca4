"""Incremental decoding against full-forward logits, sampling, stop tokens, and the chunk-bounded cache."""

from __future__ import annotations

import numpy as np
import pytest

from l4compile.runtime import Engine, RuntimeInputError
from l4compile.runtime.sampling import Sampling
from tests.conftest import TINY_SPECS, token_ids


@pytest.fixture(scope="module")
def engines(built_tiny):
    return {name: Engine.load(built_tiny(name)) for name in TINY_SPECS}


@pytest.mark.parametrize("name", TINY_SPECS)
@pytest.mark.parametrize("prefill, step", [(5, 1), (8, 1), (13, 1), (3, 6), (16, 5)])
def test_cached_steps_match_full_forward(name, prefill, step, engines):
    """Prefill, then feed the rest `step` tokens at a time: every logit equals the full forward's.

    40 tokens with chunk 8 cross four chunk boundaries, inside steps and between them.
    """
    engine = engines[name]
    ids = token_ids(2, 40, seed=prefill * 7 + step)
    full = engine.logits(ids)
    cache = engine.new_cache(batch=2, max_length=40)
    got = [engine.step(ids[:, :prefill], cache, logits_start=0)]
    for start in range(prefill, 40, step):
        got.append(engine.step(ids[:, start:start + step], cache, logits_start=0))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-4, rtol=0)
    assert cache.length == 40


def test_cached_steps_with_global_layers_between_chunked_ones(tmp_path):
    """Eight layers, NoPE at 3 and 7: a prefill crossing a chunk boundary copies some layers' new keys
    and writes others in place; each must land in its own layer's cache."""
    import dataclasses
    from l4compile.build import BuildOptions, build
    from l4compile.weights import RandomWeights
    from tests.conftest import load
    spec = dataclasses.replace(load("tiny-scout"), num_layers=8, nope_layers=(3, 7), moe_layers=tuple(range(8)))
    build(spec, tmp_path / "m", RandomWeights(0), BuildOptions(), log=lambda _: None)
    engine = Engine.load(tmp_path / "m")
    ids = token_ids(2, 30, seed=8)
    cache = engine.new_cache(batch=2, max_length=30)
    got = [engine.step(ids[:, :13], cache, logits_start=0)]
    got += [engine.step(ids[:, s:s + 1], cache, logits_start=0) for s in range(13, 30)]
    np.testing.assert_allclose(np.concatenate(got, axis=1), engine.logits(ids), atol=1e-4, rtol=0)


def test_chunked_layers_keep_only_their_chunk(engines):
    engine = engines["tiny-scout"]
    cache = engine.new_cache(batch=1, max_length=1000)
    capacities = [layer.capacity for layer in cache.layers]
    assert capacities == [8, 8, 8, 1000]  # three chunked layers, one global (NoPE) layer
    naive = 4 * 2 * 1000 * 2 * 16 * 4
    assert cache.nbytes == naive * (3 * 8 + 1000) // 4000


@pytest.mark.parametrize("name", TINY_SPECS)
def test_greedy_generate_matches_argmax_of_full_forward(name, engines):
    engine = engines[name]
    prompt = token_ids(2, 6, seed=11)
    out = engine.generate(prompt, max_new_tokens=30, stop_tokens=())
    assert out.shape == (2, 36) and np.array_equal(out[:, :6], prompt)
    seq = prompt
    for _ in range(30):
        seq = np.concatenate([seq, engine.logits(seq)[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_stream_yields_what_generate_returns(engines):
    engine = engines["tiny-maverick"]
    prompt = token_ids(1, 4, seed=5)
    streamed = list(engine.stream(prompt[0], max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1, stop_tokens=()))
    again = engine.generate(prompt, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1, stop_tokens=())
    assert streamed == again[0, 4:].tolist()


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(engines):
    engine = engines["tiny-scout"]
    prompt = token_ids(1, 4, seed=2)
    runs = [engine.generate(prompt, 20, temperature=1.5, seed=s, stop_tokens=()) for s in (1, 1, 2)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_stop_tokens_end_generation_and_fill_finished_rows(engines):
    engine = engines["tiny-scout"]
    prompt = token_ids(2, 5, seed=4)
    free = engine.generate(prompt, 10, stop_tokens=())
    stop = int(free[0, 7])  # the third new token of row 0
    out = engine.generate(prompt, 10, stop_tokens=(stop,))
    assert (out[0, 7:] == stop).all()
    row1 = free[1, 5:].tolist()
    if stop not in row1:  # row 1 never stops: generation runs to max_new_tokens
        assert out.shape == (2, 15) and out[1, 5:].tolist() == row1


def test_sampling_choices():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert Sampling().choose(logits, rng).tolist() == [0]
    assert Sampling(temperature=1.0, top_k=1).choose(logits, rng).tolist() == [0]
    assert Sampling(temperature=1.0, top_p=0.4).choose(logits, rng).tolist() == [0]
    draws = np.array([Sampling(temperature=1.0).choose(logits, rng)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top_p = np.array([Sampling(temperature=1.0, top_p=0.75).choose(logits, rng)[0] for _ in range(2000)])
    assert set(top_p.tolist()) == {0, 1}  # 0.5 + 0.3 passes 0.75: the tail is cut
    top_k = np.array([Sampling(temperature=1.0, top_k=3).choose(logits, rng)[0] for _ in range(2000)])
    assert set(top_k.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be in"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"max_new_tokens": 5000}, "exceeds the model's maximum context"),
])
def test_bad_generation_arguments(kwargs, message, engines):
    engine = engines["tiny-scout"]
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(RuntimeInputError, match=message):
        engine.generate(np.array([[1, 2]]), **args)
    assert engine.generate(np.array([[1, 2]]), 2).shape[1] <= 4


def test_stream_wants_one_prompt(engines):
    with pytest.raises(RuntimeInputError, match="one prompt"):
        next(engines["tiny-scout"].stream(np.array([[1, 2]]), 3))


def test_the_nucleus_equals_the_full_sort_s_with_ties_and_wide_nuclei():
    """top-p keeps, in a stable sort by descending probability, every token whose predecessors sum to less than
    top_p. The sampler sorts only the most probable tokens when the nucleus ends among them: the kept tokens must
    be exactly the full sort's (ties at the candidates' edge, nuclei wider than the candidates, Llama 4's vocabulary),
    and so must the tokens drawn with one seed."""
    from l4compile.runtime import sampling

    def by_full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
        order = np.argsort(-probs, kind="stable")
        return np.sort(order[np.cumsum(probs[order]) - probs[order] < top_p])

    rng = np.random.default_rng(0)
    vocab = 202_048
    cases = []
    for spread in (0.5, 2.0, 8.0, 30.0):   # flat (nucleus of tens of thousands) to peaked (a handful)
        logits = rng.standard_normal(vocab) * spread
        logits[rng.integers(0, vocab, 3000)] = np.round(logits.max() - 3)   # ties around the candidates' edge
        cases.append(logits)
    tied = np.zeros(vocab)
    tied[:5000] = 4.0   # 5000 tokens of one probability, more than the candidates
    cases.append(tied)
    widths = set()
    for logits in cases:
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        for top_p in (0.05, 0.5, 0.9, 0.999):
            got = np.sort(sampling._nucleus(probs, top_p))
            np.testing.assert_array_equal(got, by_full_sort(probs, top_p))
            widths.add(len(got) > sampling.NUCLEUS_CANDIDATES)
    assert widths == {True, False}   # both ways were taken
    logits = np.stack(cases[:3]).astype(np.float32)
    for seed in range(5):
        got = Sampling(temperature=0.6, top_p=0.9).choose(logits, np.random.default_rng(seed))
        scaled = logits.astype(np.float64) / 0.6
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        kept = np.zeros_like(probs)
        for row, out in zip(probs, kept):
            nucleus = by_full_sort(row, 0.9)
            out[nucleus] = row[nucleus]
        kept /= kept.sum(axis=-1, keepdims=True)
        draws = np.random.default_rng(seed).random((3, 1))
        assert got.tolist() == (np.cumsum(kept, axis=-1) < draws).sum(axis=-1).tolist()
