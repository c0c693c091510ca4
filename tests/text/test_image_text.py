"""Images inside text: `complete` / `chat` / `chat_stream` with images, `run --image --prompt`, `chat`'s `/image`.

The ids are compared with transformers' Llama4Processor on the same tokenizer (the Llama 4-style test tokenizer)
and chat template: its prompt expansion (`replace_image_token`, `get_text_with_replacements`, the tokenizer call
and `apply_chat_template`) runs for real. Its image processor needs torchvision, which is not installable here,
so a stand-in gives the processor our tiles and tile grids (runtime/preprocess.py): what is compared is the
expansion of the text, not the pixels. Greedy tokens of the text API equal those of the low-level ids path.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from l4compile.runtime import Engine, RuntimeInputError
from l4compile.runtime.preprocess import preprocess_image
from tests.conftest import spec_path
from tests.text.conftest import token_ids
from tests.text.llama4_tokenizer import STOP_TOKENS, model_vocab

WIDE = np.random.default_rng(0).integers(0, 256, (60, 120, 3), dtype=np.uint8)     # 2 x 3 tiles + thumbnail
SMALL = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)     # one tile


@pytest.fixture(scope="module")
def vision_text_build(tmp_path_factory, tokenizer_dir):
    """tiny-vision (56-pixel tiles, 4 features per tile) with the test tokenizer's vocabulary: its image token is
    the tokenizer's <|patch|>."""
    from l4compile.build import BuildOptions, build
    from l4compile.spec import load_spec
    from l4compile.weights import RandomWeights
    ids = token_ids(tokenizer_dir)
    eos = ", ".join(str(ids[t]) for t in STOP_TOKENS)
    text = spec_path("tiny-vision").read_text().replace("vocab_size: 256", f"vocab_size: {model_vocab(tokenizer_dir)}")
    text = text.replace("tokens: {bos: 1, eos: [2], pad: 0, image: 255}",
                        f"tokens: {{bos: {ids['<|begin_of_text|>']}, eos: [{eos}], image: {ids['<|patch|>']}}}")
    root = tmp_path_factory.mktemp("vision-text")
    (root / "spec.yaml").write_text(text)
    build(load_spec(root / "spec.yaml"), root / "build", RandomWeights(5), BuildOptions(tokenizer=str(tokenizer_dir)),
          log=lambda _: None)
    return root / "build"


@pytest.fixture(scope="module")
def engine(vision_text_build):
    return Engine.load(vision_text_build)


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    """transformers' Llama4Processor over the test tokenizer, with a stand-in image processor (no torchvision)."""
    from transformers import AutoTokenizer
    from transformers.image_processing_utils import ImageProcessingMixin
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    class OurTiles(ImageProcessingMixin):
        """What Llama4ImageProcessor returns, computed by runtime/preprocess.py: tiles and (rows, cols) per image."""

        def __call__(self, images, **kwargs):
            done = [preprocess_image(image, 56, 16) for image in images]
            return {"pixel_values": [pixels for pixels, _ in done], "aspect_ratios": [grid for _, grid in done]}

        def fetch_images(self, images):
            return images

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return Llama4Processor(image_processor=OurTiles(), tokenizer=tokenizer, patch_size=14, pixel_shuffle_ratio=0.5,
                           chat_template=tokenizer.chat_template)


def test_prompt_ids_equal_llama4_processor(engine, processor):
    for text, images in [("Compare <|image|> with <|image|>: which is wider?", [WIDE, SMALL]),
                         ("<|image|>Describe it.", [SMALL]), ("Plain text, no image.", [])]:
        ids, pixels = engine.prepare_prompt(text, images)
        want = processor(text=text, images=images or None)["input_ids"][0]
        assert ids.tolist() == want
        assert (pixels is None) == (not images)
    assert engine.prepare_prompt("What is this?", [WIDE])[0].tolist() == \
        processor(text="<|image|>What is this?", images=[WIDE])["input_ids"][0]   # no placeholder: images first
    ids, pixels = engine.prepare_prompt("A <|image|> B", [WIDE])
    assert pixels.shape == (7, 3, 56, 56) and int((ids == engine.vision.image_token).sum()) == 7 * 4


def test_chat_ids_equal_llama4_processor_apply_chat_template(engine, processor):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": WIDE}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A pattern."},
                {"role": "user", "content": [{"type": "text", "text": "And this one"},
                                             {"type": "image", "image": SMALL}, {"type": "text", "text": "?"}]}]
    want = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids, pixels = engine.prepare_chat(messages)
    assert ids.tolist() == (want[0] if isinstance(want[0], list) else want)
    assert pixels.shape == (8, 3, 56, 56)
    bare = [{**m, "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})} for p in m["content"]]}
            if isinstance(m["content"], list) else m for m in messages]
    ids_given, _ = engine.prepare_chat(bare, images=[WIDE, SMALL])   # bare parts + images=, as the processor takes
    assert ids_given.tolist() == ids.tolist()


def spy_on_stream(engine):
    """The tokens each `engine.stream` call yields, recorded."""
    calls = []
    stream = engine.stream

    def recording(*args, **kwargs):
        calls.append([])
        for token in stream(*args, **kwargs):
            calls[-1].append(token)
            yield token
    return calls, recording


def test_text_api_greedy_tokens_equal_the_ids_path(engine, monkeypatch):
    """complete / chat / chat_stream with images: the tokens of generate() on the same ids and pixels."""
    calls, recording = spy_on_stream(engine)
    monkeypatch.setattr(engine, "stream", recording)
    tokens = token_ids(engine.directory)   # the build carries the tokenizer files
    text = engine.complete("Describe <|image|> briefly.", 12, images=[WIDE], temperature=0, stop_tokens=())
    prompt = engine.tokenizer.encode("Describe <|image|> briefly.")
    ids, pixels = engine.prepare_images(np.array(prompt), [WIDE])
    low = engine.generate(ids, 12, pixel_values=pixels, stop_tokens=())[0, ids.shape[1]:].tolist()
    assert calls[-1] == low and text == engine.tokenizer.decode(low)

    messages = [{"role": "user", "content": [{"type": "image", "image": SMALL}, {"type": "text", "text": "Hi"}]}]
    answer = "".join(engine.chat_stream(messages, 12, temperature=0, stop_tokens=()))
    rendered = engine.tokenizer.encode(engine.render_chat(messages), add_special_tokens=False)
    assert rendered.count(tokens["<|image|>"]) == 1
    ids, pixels = engine.prepare_images(np.array(rendered), [SMALL])
    low = engine.generate(ids, 12, pixel_values=pixels, stop_tokens=())[0, ids.shape[1]:].tolist()
    assert calls[-1] == low and answer == engine.tokenizer.decode(low)
    assert engine.chat(messages, 12, temperature=0, stop_tokens=()) == answer


def test_image_errors_are_one_line_and_the_engine_stays_usable(engine, vision_text_build, tmp_path):
    for call in [lambda: engine.complete("<|image|> and <|image|>", 2, images=[SMALL]),     # 2 placeholders, 1 image
                 lambda: engine.complete("<|image|> what?", 2),                             # a placeholder, no image
                 lambda: engine.chat([{"role": "user", "content": [{"type": "image"}]}], 2),  # a part without image
                 lambda: engine.complete("x", 2, images=[tmp_path / "missing.png"]),
                 lambda: engine.complete("x", 2, images=[np.zeros((4, 4), np.float32)[None]])]:
        with pytest.raises(RuntimeInputError):
            call()
    greedy = dict(images=[SMALL], temperature=0, stop_tokens=())
    assert engine.complete("Hello", 4, **greedy) == Engine.load(vision_text_build).complete("Hello", 4, **greedy)


def test_text_only_build_refuses_images_in_text(text_build):
    text_only = Engine.load(text_build)
    with pytest.raises(RuntimeInputError, match="text-only"):
        text_only.complete("Hi", 2, images=[SMALL])
    with pytest.raises(RuntimeInputError, match="text-only"):
        text_only.chat([{"role": "user", "content": [{"type": "image", "image": SMALL}]}], 2)
    # a bare image part without an image is rendered as text, as before
    assert isinstance(text_only.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}],
                                     2), str)


def cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.mark.slow
def test_cli_run_and_chat_with_images(vision_text_build, engine, tmp_path):
    from PIL import Image
    Image.fromarray(WIDE).save(tmp_path / "wide.png")
    Image.fromarray(SMALL).save(tmp_path / "small.png")
    greedy = ("--max-new-tokens", 10, "--temperature", 0, "-q")
    r = cli("run", vision_text_build, "--image", tmp_path / "wide.png", "--prompt", "Describe <|image|> now.", *greedy)
    assert r.returncode == 0, r.stderr
    assert r.stdout == engine.complete("Describe <|image|> now.", 10, images=[WIDE], temperature=0)
    r = cli("run", vision_text_build, "--image", tmp_path / "small.png", "--prompt", "What is it?", "--chat", *greedy)
    parts = [{"type": "image", "image": SMALL}, {"type": "text", "text": "What is it?"}]
    assert r.returncode == 0 and r.stdout == engine.chat([{"role": "user", "content": parts}], 10, temperature=0)
    r = cli("chat", vision_text_build, "--max-new-tokens", 10, "--temperature", 0,
            stdin=f"/image {tmp_path / 'small.png'}\nWhat is it?\nAnd now?\n/image {tmp_path / 'nope.png'}\n")
    assert r.returncode == 0, r.stderr
    first = engine.chat([{"role": "user", "content": parts}], 10, temperature=0)
    second = engine.chat([{"role": "user", "content": parts}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "And now?"}], 10, temperature=0)
    assert r.stdout == f"{first}\n{second}\n"
    assert "attached to your next message" in r.stderr and "cannot read image" in r.stderr
    r = cli("run", vision_text_build, "--image", tmp_path / "small.png", "--prompt", "<|image|><|image|>", "-q")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_chat_session_counts_image_tokens_in_the_context(engine):
    """/image in the REPL: the image goes with the next message only, and its expanded tokens count."""
    from l4compile.text_cli import ChatSession
    session = ChatSession(engine, max_new_tokens=4)
    session.pending.append((SMALL, len(engine.prepare_images(np.array([token_ids(engine.directory)["<|image|>"]]),
                                                             [SMALL])[0][0])))
    messages = session.messages_for("Hi", lambda _: None)
    assert session._length(messages) == len(engine.prepare_chat(messages)[0])
    session.answer("Hi", io.StringIO(), lambda _: None, temperature=0)
    assert not session.pending and session.turns[0]["content"][0]["type"] == "image"
    messages = session.messages_for("Again", lambda _: None)
    assert session._length(messages) == len(engine.prepare_chat(messages)[0])
