"""The Engine's text API on a build of a random tiny checkpoint saved with a Llama 4-style tokenizer:
greedy text equal to transformers' generate + decode, streaming, generation-config defaults, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from l4compile.runtime import Engine, RuntimeInputError
from l4compile.runtime.errors import BuildDirError
from tests.text.conftest import token_ids

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France? 🇫🇷 東京?"}]
GREEDY = dict(temperature=0.0)


def hf_generate(model, tokenizer, inputs, new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def engine(text_build):
    return Engine.load(text_build)


def test_build_carries_the_tokenizer_and_generation_config(text_build, tokenizer_dir):
    manifest = json.loads((text_build / "manifest.json").read_text())
    for role, name in [("tokenizer", "tokenizer.json"), ("tokenizer_config", "tokenizer_config.json"),
                       ("chat_template", "chat_template.jinja"), ("generation_config", "generation_config.json"),
                       ("special_tokens_map", "special_tokens_map.json")]:
        assert manifest["files"][role] == name
        assert (text_build / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    ids = token_ids(tokenizer_dir)
    assert manifest["text"]["stop_tokens"] == [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]
    assert manifest["text"]["sampling"] == {"temperature": 0.6, "top_k": 0, "top_p": 0.9}


def test_prompt_and_chat_ids_equal_transformers(engine, hf_tokenizer):
    prompt = "The capital of France is"
    assert engine.encode_prompt(prompt).tolist() == hf_tokenizer(prompt)["input_ids"]
    assert engine.encode_chat(CHAT).tolist() == hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)[
        "input_ids"]


@pytest.mark.parametrize("new_tokens", [40])
def test_greedy_text_equals_transformers_generate_and_decode(engine, hf_model, hf_tokenizer, new_tokens):
    prompt = "Once upon a time"
    want = hf_generate(hf_model, hf_tokenizer, hf_tokenizer(prompt, return_tensors="pt"), new_tokens)
    assert engine.complete(prompt, new_tokens, **GREEDY) == want
    chat = hf_generate(hf_model, hf_tokenizer, hf_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt"), new_tokens)
    assert engine.chat(CHAT, new_tokens, **GREEDY) == chat
    assert len(want) > 10 and len(chat) > 0


def test_streamed_pieces_join_to_the_decoded_text(engine):
    """The pieces of a stream join to the decode of the ids the model generated (up to its stop token): random
    weights emit byte tokens that split (or never complete) emoji and CJK characters, a hard case for streaming."""
    def generated(ids, **options) -> list[int]:
        new = engine.generate(ids[None], 48, stop_tokens=(), **options)[0, len(ids):].tolist()
        return new[:min([new.index(t) for t in engine.default_stop_tokens if t in new], default=len(new))]

    split = 0   # generated tokens that hold part of a character only
    for messages in (CHAT, [{"role": "user", "content": "Emoji 👋🏽 and 你好"}]):
        pieces = list(engine.chat_stream(messages, 48, **GREEDY))
        new = generated(engine.encode_chat(messages), **GREEDY)
        assert len(pieces) > 1 and "".join(pieces) == engine.tokenizer.decode(new)
        split += sum("\ufffd" in engine.tokenizer.decode([t]) for t in new)
    sampled = dict(temperature=0.9, top_p=1.0, seed=5)
    pieces = list(engine.complete_stream("東京 🚀", 48, **sampled))
    new = generated(engine.encode_prompt("東京 🚀"), **sampled)
    assert "".join(pieces) == engine.tokenizer.decode(new)
    assert split + sum("\ufffd" in engine.tokenizer.decode([t]) for t in new) > 0


def test_defaults_come_from_the_generation_config(engine):
    """Sampling (temperature 0.6, top_p 0.9) unless overridden; stop tokens end the text and are not in it."""
    assert engine._text_options(10, None, None, None, None, None) == {   # max_new_tokens: 256, within the context
        "max_new_tokens": 246, "stop_tokens": engine.default_stop_tokens, "temperature": 0.6, "top_k": 0, "top_p": 0.9}
    a = engine.complete("Hello", 24, seed=1)
    assert a == engine.complete("Hello", 24, seed=1, temperature=0.6, top_p=0.9)
    assert engine.complete("Hello", 24, seed=1, temperature=0.0) == engine.complete("Hello", 24, **GREEDY)
    ids = engine.encode_prompt("Hello")
    greedy = engine.generate(ids[None], 24, stop_tokens=())[0, len(ids):].tolist()
    first = greedy[3]   # make the 4th greedy token a stop token: the text ends before it
    assert engine.complete("Hello", 24, stop_tokens=[first], **GREEDY) == engine.tokenizer.decode(
        greedy[:greedy.index(first)])


def test_token_id_generation_stops_at_the_generation_config_stop_tokens(engine, text_checkpoint, tmp_path):
    """`generate` / `stream` without stop_tokens stop where the text API does: at generation_config.json's
    eos_token_id (here one that config.json's eos, the spec's, does not name)."""
    from l4compile.build import BuildOptions, build
    from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
    from tests.text.llama4_tokenizer import save_tokenizer
    ids = engine.encode_prompt("Hello")
    greedy = engine.generate(ids[None], 12, stop_tokens=())[0, len(ids):].tolist()
    stop = next(t for i, t in enumerate(greedy) if i >= 3 and t not in greedy[:i])
    config, file = load_hf_config(text_checkpoint)
    spec = spec_from_hf_config(config, "tiny-text", str(file))
    tokenizer = save_tokenizer(tmp_path / "tokenizer", generation={"eos_token_id": stop})
    build(spec, tmp_path / "b", HFCheckpoint.for_spec(text_checkpoint, spec), BuildOptions(tokenizer=str(tokenizer)),
          log=lambda _: None)
    other = Engine.load(tmp_path / "b")
    assert other.default_stop_tokens == (stop,) and stop not in other.manifest.tokens["eos"]
    until_stop = ids.tolist() + greedy[:greedy.index(stop) + 1]
    assert other.generate(ids[None], 12, temperature=0.0)[0].tolist() == until_stop
    assert other.generate([ids], 12, temperature=0.0)[0].tolist() == until_stop
    assert list(other.stream(ids, 12)) == greedy[:greedy.index(stop) + 1]
    assert other.complete("Hello", 12, temperature=0.0) == engine.tokenizer.decode(greedy[:greedy.index(stop)])


def test_generate_text_rows_equal_single_prompts(engine):
    prompts = ["Hi", "The capital of France is", CHAT, "Once upon a time there was a little compiler"]
    texts = engine.generate_text(prompts, 20, **GREEDY)
    singles = [engine.complete(p, 20, **GREEDY) if isinstance(p, str) else engine.chat(p, 20, **GREEDY)
               for p in prompts]
    assert texts == singles


def test_text_errors_are_clear_and_the_engine_stays_usable(engine, text_build, tmp_path):
    with pytest.raises(RuntimeInputError, match="unknown role 'robot'"):
        engine.chat([{"role": "robot", "content": "beep"}], 4)
    with pytest.raises(RuntimeInputError, match=r"the prompt is \d+ tokens; the model's context is 256"):
        engine.complete("word " * 300, 4)
    with pytest.raises(RuntimeInputError, match="exceeds the model's maximum context 256"):
        engine.complete("Hello", 300)
    with pytest.raises(RuntimeInputError, match="a prompt must be a string"):
        engine.complete(["not", "a", "string"], 4)
    assert engine.complete("Hello", 4, **GREEDY) == Engine.load(text_build).complete("Hello", 4, **GREEDY)  # as new

    broken = tmp_path / "broken-template"
    shutil.copytree(text_build, broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    from l4compile.runtime import integrity   # re-record the checksums, as if it had been built this way
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["checksums"] = integrity.record(broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    e = Engine.load(broken)
    with pytest.raises(RuntimeInputError, match="chat template does not compile"):
        e.chat(CHAT, 4)
    assert e.complete("Hello", 4, **GREEDY) == engine.complete("Hello", 4, **GREEDY)


def test_build_without_a_tokenizer_names_the_fix(built_tiny):
    engine = Engine.load(built_tiny("tiny-scout"))
    for call in (lambda: engine.complete("Hello", 4), lambda: engine.chat([{"role": "user", "content": "x"}], 4),
                 lambda: engine.generate_text(["a", "b"], 4)):
        with pytest.raises(BuildDirError, match="has no tokenizer.*--tokenizer DIR"):
            call()
    assert engine.generate(np.array([[1, 2, 3]]), 4).shape == (1, 7)


def generate_recording_logits(engine, monkeypatch, ids, new_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`engine.generate(ids, new_tokens)` (greedy, no stop tokens) -> (its rows, each row's logits [new, vocab]: those
    each of its new tokens was chosen from), the logits read from the Engine's steps (prefills, then decode steps)."""
    steps = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda *a, **k: steps.append(step(*a, **k)[:, -1]) or steps[-1][:, None])
    out = engine.generate(ids, new_tokens, temperature=0.0, stop_tokens=())
    monkeypatch.undo()
    rows = len(out)
    prefills, decodes = steps[:rows] if isinstance(ids, list) else [steps[0]], steps[len(steps) - new_tokens + 1:]
    prefill = np.concatenate(prefills)
    return list(out), [np.stack([prefill[b]] + [d[b] for d in decodes]) for b in range(rows)]


def test_ragged_text_batch_equals_single_prompts(engine, hf_model, monkeypatch):
    """4 prompts of 7, 8, 10 and 17 tokens (chunk 8: before, at and after the first boundary, past the second)
    run as one ragged `generate` call: tokens identical to the four single-prompt runs, every logit within 1e-4
    of theirs and of transformers' forward over the generated text; and so are the texts."""
    from tests.hf.conftest import hf_logits
    words = "The capital of France is Paris and the capital of Japan is Tokyo , said the compiler".split()
    prompts = [" ".join(words[:n]) for n in (6, 7, 8, 14)]
    rows = [engine.encode_prompt(p) for p in prompts]
    assert [len(r) for r in rows] == [7, 8, 10, 17]
    ragged, ragged_logits = generate_recording_logits(engine, monkeypatch, rows, 20)
    for row, out, logits in zip(rows, ragged, ragged_logits):
        (alone,), (alone_logits,) = generate_recording_logits(engine, monkeypatch, row[None], 20)
        np.testing.assert_array_equal(out, alone)
        np.testing.assert_allclose(logits, alone_logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, hf_logits(hf_model, out[None, :-1])[0, len(row) - 1:], atol=1e-4, rtol=0)
        assert len(out) == len(row) + 20 and (logits.argmax(-1) == out[len(row):]).all()

    calls = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda ids, *a, **k: calls.append(ids) or generate(ids, *a, **k))
    texts = engine.generate_text(prompts + [CHAT], 20, **GREEDY)
    assert len(calls) == 1 and isinstance(calls[0], list) and len(calls[0]) == 5   # one ragged call
    monkeypatch.undo()
    assert texts == [engine.complete(p, 20, **GREEDY) for p in prompts] + [engine.chat(CHAT, 20, **GREEDY)]
    sampled = engine.generate_text(prompts, 12, temperature=0.8, seed=3)
    assert sampled == [engine.complete(p, 12, temperature=0.8, seed=3) for p in prompts]
