"""Images through the chat API: a random tiny multimodal checkpoint saved with the Llama 4-style tokenizer,
built, served; image content parts (data: URLs) give Engine's text for the same prompt and pixels."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import ServerProcess
from tests.text.conftest import token_ids

pytestmark = pytest.mark.slow
NEW = 12


@pytest.fixture(scope="module")
def vision_build(tmp_path_factory, tokenizer_dir):
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from l4compile.build import BuildOptions, build
    from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
    from l4compile.tokenizer_files import tokenizer_source
    from tests.hf.conftest import TINY_VISION, randomize, text_config
    from tests.text.llama4_tokenizer import STOP_TOKENS, model_vocab, save_tokenizer
    ids = token_ids(tokenizer_dir)
    text = text_config(vocab_size=model_vocab(tokenizer_dir), bos_token_id=ids["<|begin_of_text|>"],
                       eos_token_id=[ids[t] for t in STOP_TOKENS], pad_token_id=ids["<|finetune_right_pad|>"])
    config = Llama4Config(text_config=text.to_dict(), vision_config=TINY_VISION, image_token_index=ids["<|patch|>"])
    torch.manual_seed(5)
    root = tmp_path_factory.mktemp("vision-text")
    randomize(Llama4ForConditionalGeneration(config), 5).save_pretrained(root / "hf")
    save_tokenizer(root / "hf")
    config, file = load_hf_config(root / "hf")
    spec = spec_from_hf_config(config, "mm-text", str(file))
    build(spec, root / "build", HFCheckpoint.for_spec(root / "hf", spec),
          BuildOptions(tokenizer=tokenizer_source(None, str(root / "hf"))), log=lambda _: None)
    return root / "build"


@pytest.fixture(scope="module")
def vision_server(vision_build, tmp_path_factory):
    process = ServerProcess(vision_build, "--max-batch", "4", log=tmp_path_factory.mktemp("serve") / "server.log")
    yield process.start()
    process.stop()


def picture(width: int, height: int, seed: int):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def engine_answer(engine, question: str, images: list) -> str:
    """Engine alone: `chat` with image parts (expanded as Llama4Processor does)."""
    content = [{"type": "text", "text": question}] + [{"type": "image"} for _ in images]
    return engine.chat([{"role": "user", "content": content}], NEW, temperature=0.0, images=images)


def test_image_parts_give_engine_text(vision_build, vision_server):
    from l4compile.runtime import Engine
    engine = Engine.load(vision_build)
    assert engine.manifest.kv_cache["in_place"]
    cases = [("What is in this picture?", [picture(84, 56, 1)]),
             ("Compare these two", [picture(20, 60, 2), picture(28, 28, 3)]),
             ("No picture, just text", [])]
    want = [engine_answer(engine, question, images) for question, images in cases]
    black = Image.fromarray(np.zeros((56, 84, 3), np.uint8))
    assert want[0] != engine_answer(engine, cases[0][0], [black])   # these pixels change the answer
    client = vision_server.client()

    def ask(case) -> str:
        question, images = case
        content = [{"type": "text", "text": question}] + [{"type": "image_url", "image_url": {"url": data_url(i)}}
                                                          for i in images]
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                               max_tokens=NEW, temperature=0.0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        assert list(pool.map(ask, cases)) == want


@pytest.mark.parametrize("url, param", [
    ("https://example.com/cat.png", "messages[0].content[1].image_url.url"),
    ("data:image/png;base64,@@@", "messages[0].content[1].image_url.url"),
    ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "messages[0].content[1].image_url.url"),
])
def test_bad_images_are_400_naming_the_part(vision_server, url, param):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    reply = httpx.post(vision_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, param), reply.text
