"""--target ort-genai: onnxruntime-genai loads the build as it is and generates what our runtime and
transformers generate on the same weights (prompts across chunk boundaries and temperature floors)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest

from tests.conftest import load, spec_path
from tests.genai.conftest import Genai, build_genai, until_stop

# The tiny specs: chunk 8, temperature floor 4. 41 and 27 tokens cross five and three chunk boundaries.
PROMPT_LENGTHS = (41, 27)
NEW_TOKENS = 20


def prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 5, low: int = 3) -> list[np.ndarray]:
    """Random prompts without the pad or stop ids of the tiny specs (genai finds padding by the pad id)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab, n).astype(np.int64) for n in lengths]


@pytest.fixture(scope="module")
def tiny_genai(tmp_path_factory):
    """name -> genai build of that tiny spec with random weights (seed 0), as built_tiny's."""
    from l4compile.weights import RandomWeights
    cache = {}

    def get(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = build_genai(load(name), RandomWeights(0), tmp_path_factory.mktemp("genai") / name, **options)
        return cache[key]
    return get


def test_genai_config_and_files(tiny_genai):
    out = tiny_genai("tiny-scout")
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama" and decoder["filename"] == "model.onnx"
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (4, 4, 2, 16, 64)
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"]["present_key_names"] == "present.%d.key"
    assert config["search"]["past_present_share_buffer"] is True
    assert (config["model"]["eos_token_id"], config["model"]["pad_token_id"], config["model"]["bos_token_id"]) == (2, 0, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "ort-genai" and manifest["files"]["genai_config"] == "genai_config.json"


def test_engine_refuses_a_genai_build(tiny_genai):
    from l4compile.runtime import Engine
    from l4compile.runtime.errors import BuildDirError
    with pytest.raises(BuildDirError, match="onnxruntime_genai.Model"):
        Engine.load(tiny_genai("tiny-scout"))


@pytest.mark.parametrize("args, message", [
    (["--tp", "2"], "builds one unsharded model"),
    (["--dtype", "bfloat16"], "bfloat16"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "l4compile", "build", str(spec_path("tiny-scout")), "--weights",
                             "random", "--target", "ort-genai", "-o", str(tmp_path / "b"), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


def test_vision_spec_builds_its_text_model_saying_so(tmp_path, built_tiny):
    """A spec with a vision tower: one warning line, and the text model, which generates what our runtime
    generates on the --target onnx vision build from text alone."""
    import subprocess
    import sys

    from l4compile.runtime import Engine
    out = tmp_path / "b"
    result = subprocess.run([sys.executable, "-m", "l4compile", "build", str(spec_path("tiny-vision")), "--weights",
                             "random", "--target", "ort-genai", "-o", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "text model only" in warnings[0] and "vision tower" in warnings[0]
    assert not (out / "vision.onnx").exists()
    engine, genai = Engine.load(built_tiny("tiny-vision")), Genai(out)
    image = engine.manifest.vision["image_token"]
    rows = [r[r != image] for r in prompts(engine.manifest.vocab_size, lengths=(20,))]
    np.testing.assert_array_equal(genai.greedy(rows, NEW_TOKENS)[0], engine_greedy(engine, rows, genai.eos)[0])


def engine_greedy(engine, rows: list[np.ndarray], stop: set[int]) -> list[np.ndarray]:
    """Our runtime's greedy tokens after each prompt, up to and including the first of genai's EOS ids."""
    outs = engine.generate(rows, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    return [np.concatenate([p, until_stop(out[len(p):], stop)]) for p, out in zip(rows, outs)]


@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
def test_genai_tokens_equal_engine(built_tiny, tiny_genai, name):
    """Batch 1 and a right-padded batch 2: genai's greedy tokens are our Engine's (same random weights)."""
    from l4compile.runtime import Engine
    engine, genai = Engine.load(built_tiny(name)), Genai(tiny_genai(name))
    rows = prompts(engine.manifest.vocab_size)
    ours = engine_greedy(engine, rows, genai.eos)
    for batch in ([0], [1], [0, 1], [1, 0]):
        theirs = genai.greedy([rows[i] for i in batch], NEW_TOKENS)
        for i, got in zip(batch, theirs):
            np.testing.assert_array_equal(got, ours[i])


TEXTS = ["The capital of France is Paris. The capital of Japan is Tokyo. Once upon a time there was a little "
         "compiler that lowered graphs.",
         "Hello, how are you today? 東京は日本の首都です。 👋 🎉"]


@pytest.mark.slow
def test_genai_text_build_matches_transformers_and_engine(genai_text_build, text_build, hf_model, hf_tokenizer):
    """The checkpoint with its tokenizer: genai's tokenizer gives our ids and transformers'; genai's greedy
    tokens (batch 1 and 2) are transformers' and our Engine's."""
    import torch

    from l4compile.runtime import Engine
    genai, engine = Genai(genai_text_build), Engine.load(text_build)
    tokenizer = og.Tokenizer(genai.model)
    for text in TEXTS:   # genai's default: no special tokens added
        np.testing.assert_array_equal(tokenizer.encode(text), engine.encode_prompt(text, add_special_tokens=False))
    tokenizer.update_options(add_special_tokens="true")
    rows = []
    for text in TEXTS:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        np.testing.assert_array_equal(ids, engine.encode_prompt(text))
        np.testing.assert_array_equal(ids, hf_tokenizer(text)["input_ids"])
        rows.append(ids)
    messages = [{"role": "user", "content": TEXTS[1]}]   # the chat template genai renders is the checkpoint's
    chat = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    tokenizer.update_options(add_special_tokens="false")
    np.testing.assert_array_equal(tokenizer.encode(chat), engine.encode_chat(messages))
    assert len(rows[0]) > 3 * 8 and len(rows[1]) > 8   # across chunk boundaries (chunk 8) and temperature floors
    assert (genai_text_build / "tokenizer.json").is_file() and genai.eos == set(engine.manifest.text["stop_tokens"])
    search = genai.config["search"]   # the checkpoint's generation_config.json: do_sample, temperature 0.6, top_p 0.9
    assert (search["do_sample"], search["temperature"], search["top_p"], search["top_k"]) == (True, 0.6, 0.9, 0)
    ours = engine_greedy(engine, rows, genai.eos)
    with torch.no_grad():
        reference = [hf_model.generate(torch.from_numpy(r)[None], max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=sorted(genai.eos), pad_token_id=genai.config["model"]["pad_token_id"])
                     [0].numpy() for r in rows]
    for batch in ([0], [1], [0, 1]):
        for i, got in zip(batch, genai.greedy([rows[i] for i in batch], NEW_TOKENS)):
            np.testing.assert_array_equal(got, ours[i])
            np.testing.assert_array_equal(got, reference[i])


@pytest.mark.slow
def test_genai_int4_build_equals_runtime_int4_build(tmp_path, tiny_genai):
    """--quantize int4 (round to nearest: the codes depend on the weights alone): genai's tokens on the genai
    build are our runtime's on the --target onnx int4 build of the same weights."""
    from l4compile.build import BuildOptions, build
    from l4compile.runtime import Engine
    from l4compile.weights import RandomWeights
    quantize = {"quantize": "int4", "int4_method": "rtn"}
    genai = Genai(tiny_genai("tiny-scout", **quantize))
    build(load("tiny-scout"), tmp_path / "onnx", RandomWeights(0), BuildOptions(**quantize), log=lambda _: None)
    engine = Engine.load(tmp_path / "onnx")
    model = (genai_dir := tiny_genai("tiny-scout", **quantize)) / "model.onnx"
    import onnx
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(model), load_external_data=False).graph.node)
    assert json.loads((genai_dir / "manifest.json").read_text())["quantization"]["weights"] == "int4"
    rows = prompts(engine.manifest.vocab_size)
    # The same batches on both sides: with int8 activations (accuracy_level 4) onnxruntime's MatMulNBits kernels
    # for one row and for several round differently, so on this chaotic random model a row's greedy tokens may
    # part (both engines alike) where two logits are within ~0.01, depending on the rows decoded beside it.
    for batch in ([0], [0, 1]):
        ours = engine_greedy(engine, [rows[i] for i in batch], genai.eos)
        for got, want in zip(genai.greedy([rows[i] for i in batch], NEW_TOKENS), ours):
            np.testing.assert_array_equal(got, want)


def test_float16_build_equals_runtime_float16_build(tmp_path, tiny_genai):
    """float16 (GroupQueryAttention's float16 CPU kernel, the chunk bias at float16's lowest value): genai's tokens
    are our runtime's on the float16 --target onnx build, batch 1 and 2."""
    from l4compile.build import BuildOptions, build
    from l4compile.runtime import Engine
    from l4compile.weights import RandomWeights
    genai = Genai(tiny_genai("tiny-scout", dtype="float16"))
    build(load("tiny-scout"), tmp_path / "onnx", RandomWeights(0), BuildOptions(dtype="float16"), log=lambda _: None)
    engine = Engine.load(tmp_path / "onnx")
    rows = prompts(engine.manifest.vocab_size)
    ours = engine_greedy(engine, rows, genai.eos)
    for batch in ([0], [0, 1]):
        for i, got in zip(batch, genai.greedy([rows[i] for i in batch], NEW_TOKENS)):
            np.testing.assert_array_equal(got, ours[i])


def test_continuation_after_generated_tokens(built_tiny, tiny_genai):
    """A second turn: genai runs only appended tokens and has not run the last token it picked, so the app
    rewinds one token and appends it again with the new ones; then genai's tokens are our Engine's on the
    whole sequence (the second prompt crosses a chunk boundary)."""
    from l4compile.runtime import Engine
    engine, genai = Engine.load(built_tiny("tiny-scout")), Genai(tiny_genai("tiny-scout"))
    first, second = prompts(engine.manifest.vocab_size, lengths=(13, 11), seed=3)
    params = og.GeneratorParams(genai.model)
    params.set_search_options(max_length=64, do_sample=False)
    generator = og.Generator(genai.model, params)
    generator.append_tokens(first.astype(np.int32)[None])
    for _ in range(6):
        generator.generate_next_token()
    sequence = np.asarray(generator.get_sequence(0))
    generator.rewind_to(len(sequence) - 1)
    generator.append_tokens(np.concatenate([sequence[-1:], second]).astype(np.int32)[None])
    for _ in range(NEW_TOKENS):
        generator.generate_next_token()
    whole = np.concatenate([sequence, second])
    ours = engine.generate(whole[None], max_new_tokens=NEW_TOKENS, stop_tokens=[])[0]
    np.testing.assert_array_equal(np.asarray(generator.get_sequence(0)), ours)
