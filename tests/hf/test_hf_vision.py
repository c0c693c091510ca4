"""Early fusion against transformers' Llama4ForConditionalGeneration on the same random tiny multimodal
weights: image features, logits of prompts with one and two images, greedy tokens; the ONNX build on
onnxruntime (Engine) and the torch module (GraphModule) both.

transformers 5.24's Llama4ForConditionalGeneration.forward fails at its very end (outputs.image_outputs),
so the reference is assembled from its own parts the way its forward does: get_image_features ->
multi_modal_projector -> masked_scatter at the image tokens -> language_model(inputs_embeds=...).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l4compile.build import BuildOptions, build
from l4compile.emit.torch_module import GraphModule
from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
from l4compile.lower import lower
from l4compile.lower_vision import lower_vision, tokens_per_tile
from l4compile.runtime import Engine, RuntimeInputError
from tests.hf.conftest import multimodal, save

ATOL = 1e-4
IMAGE = 95
CASES = {
    # Scout-like text (every layer MoE, GQA 2); 56-pixel tiles: 4x4 patches -> 4 features per tile; 2 layers
    "scout-like": (dict(), dict(image_size=56, num_hidden_layers=2)),
    # Maverick-like text (MoE every 2nd layer, GQA 4, no qk norm); wider vision with 4 heads
    "maverick-like": (dict(interleave_moe_layer_step=2, num_key_value_heads=1, use_qk_norm=False),
                      dict(image_size=56, hidden_size=32, num_attention_heads=4, intermediate_size=128,
                           rope_parameters={"rope_type": "default", "rope_theta": 100.0})),
}


def reference_embeds(model, ids: np.ndarray, pixels: np.ndarray | None, prompt_len: int | None = None):
    """transformers' input embeddings with the projected image features scattered at the prompt's image tokens."""
    ids_t = torch.from_numpy(ids)
    embeds = model.get_input_embeddings()(ids_t)
    if pixels is None:
        return embeds, None
    image = model.get_image_features(pixel_values=torch.from_numpy(pixels), return_dict=True).last_hidden_state
    features = model.multi_modal_projector(image.reshape(-1, image.shape[-1]))
    mask = ids_t == IMAGE
    if prompt_len is not None:
        mask[:, prompt_len:] = False   # generated image tokens are text once the images are consumed
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), features), features


def reference_logits(model, ids, pixels, prompt_len=None) -> np.ndarray:
    with torch.no_grad():
        embeds, _ = reference_embeds(model, ids, pixels, prompt_len)
        return model.language_model(inputs_embeds=embeds).logits.numpy()


def prompt(rng, images: list[int], per_tile: int, text: int = 6) -> np.ndarray:
    """Text, then each image's tiles of image tokens, then text (ids below the image token)."""
    parts = [rng.integers(3, IMAGE, text)]
    for tiles in images:
        parts += [np.full(tiles * per_tile, IMAGE), rng.integers(3, IMAGE, text)]
    return np.concatenate(parts).astype(np.int64)


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory):
    text, vision = CASES[request.param]
    model = multimodal(seed=21, vision=vision, **text)
    model.config._attn_implementation = "eager"
    model.language_model.config._attn_implementation = "eager"
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = save(model, root / "hf")
    config, file = load_hf_config(checkpoint)
    spec = spec_from_hf_config(config, "mm", str(file))
    build(spec, root / "build", HFCheckpoint.for_spec(checkpoint, spec), BuildOptions(), log=lambda _: None)
    engine = Engine.load(root / "build")
    assert engine.manifest.kv_cache["in_place"]   # vision builds use the text builds' in-place cache
    return model, spec, checkpoint, engine


def image_spans_cross_chunks(ids: np.ndarray, chunk: int) -> bool:
    """Some run of image tokens straddles a chunk boundary: its features go to two prefill pieces."""
    positions = np.nonzero(ids[0] == IMAGE)[0]
    return any(a // chunk != b // chunk and b == a + 1 for a, b in zip(positions, positions[1:]))


def test_image_features_match(built):
    model, spec, checkpoint, engine = built
    pixels = np.random.default_rng(1).standard_normal((3, 3, 56, 56)).astype(np.float32)   # an odd tile count
    with torch.no_grad():
        _, want = reference_embeds(model, np.full((1, 3 * tokens_per_tile(spec.vision)), IMAGE), pixels)
        torch_features = GraphModule(lower_vision(spec), HFCheckpoint(checkpoint))(torch.from_numpy(pixels))
    got = engine.encode_images(pixels)
    assert got.shape == (3 * tokens_per_tile(spec.vision), spec.hidden_size) and np.abs(want.numpy()).max() > 0.1
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(torch_features.numpy(), want.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("images", [[1], [3, 2]], ids=["one-image", "two-images"])
def test_logits_with_images_match(built, images):
    model, spec, checkpoint, engine = built
    rng = np.random.default_rng(len(images))
    per_tile = tokens_per_tile(spec.vision)
    ids = prompt(rng, images, per_tile)[None]
    assert image_spans_cross_chunks(ids, spec.attention.chunk_size)
    pixels = rng.standard_normal((sum(images), 3, 56, 56)).astype(np.float32)
    want = reference_logits(model, ids, pixels)
    np.testing.assert_allclose(engine.logits(ids, pixel_values=pixels), want, atol=ATOL, rtol=0)
    features = engine.encode_images(pixels)   # encode once, reuse
    np.testing.assert_allclose(engine.logits(ids, image_features=features), want, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch_logits = GraphModule(lower(spec, kv_cache=False), HFCheckpoint(checkpoint))(
            torch.from_numpy(ids), torch.from_numpy(features))
    np.testing.assert_allclose(torch_logits.numpy(), want, atol=ATOL, rtol=0)


def test_batch_of_two_prompts_with_images(built):
    model, spec, _, engine = built
    rng = np.random.default_rng(5)
    per_tile = tokens_per_tile(spec.vision)
    ids = np.stack([prompt(rng, [2], per_tile), prompt(rng, [2], per_tile)])
    pixels = rng.standard_normal((4, 3, 56, 56)).astype(np.float32)
    np.testing.assert_allclose(engine.logits(ids, pixel_values=pixels), reference_logits(model, ids, pixels),
                               atol=ATOL, rtol=0)


@pytest.mark.slow
def test_greedy_tokens_match(built):
    """20 new tokens after a prompt with two images (crosses chunk boundaries: chunk 8)."""
    model, spec, _, engine = built
    rng = np.random.default_rng(7)
    ids = prompt(rng, [1, 2], tokens_per_tile(spec.vision))[None]
    assert image_spans_cross_chunks(ids, spec.attention.chunk_size)
    pixels = rng.standard_normal((3, 3, 56, 56)).astype(np.float32)
    ours = engine.generate(ids, max_new_tokens=20, pixel_values=pixels, stop_tokens=())
    theirs = ids
    for _ in range(20):
        logits = reference_logits(model, theirs, pixels, prompt_len=ids.shape[1])
        theirs = np.concatenate([theirs, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(ours, theirs)


def test_bad_image_input_is_one_error_and_the_engine_stays_usable(built):
    _, spec, _, engine = built
    per_tile = tokens_per_tile(spec.vision)
    ids = prompt(np.random.default_rng(3), [2], per_tile)[None]
    good = np.zeros((2, 3, 56, 56), np.float32)
    bad = {
        "shape": dict(pixel_values=np.zeros((2, 3, 28, 28), np.float32)),
        "channels": dict(pixel_values=np.zeros((2, 1, 56, 56), np.float32)),
        "rank": dict(pixel_values=np.zeros((3, 56, 56), np.float32)),
        "more images than tokens": dict(pixel_values=np.zeros((3, 3, 56, 56), np.float32)),
        "fewer images than tokens": dict(pixel_values=np.zeros((1, 3, 56, 56), np.float32)),
        "no image for the tokens": dict(),
        "features of the wrong width": dict(image_features=np.zeros((2 * per_tile, 7), np.float32)),
        "both": dict(pixel_values=good, image_features=np.zeros((2 * per_tile, spec.hidden_size), np.float32)),
    }
    for name, kwargs in bad.items():
        with pytest.raises(RuntimeInputError):
            engine.logits(ids, **kwargs)
        with pytest.raises(RuntimeInputError):
            engine.generate(ids, max_new_tokens=2, **kwargs)
    assert engine.logits(ids, pixel_values=good).shape == (1, ids.shape[1], spec.vocab_size)


def test_text_only_build_refuses_images(tmp_path):
    from l4compile.weights.random import RandomWeights
    from tests.conftest import load
    build(load("tiny-scout"), tmp_path / "b", RandomWeights(0), BuildOptions(), log=lambda _: None)
    engine = Engine.load(tmp_path / "b")
    ids = np.array([[1, 2, 3]])
    with pytest.raises(RuntimeInputError, match="text-only"):
        engine.logits(ids, pixel_values=np.zeros((1, 3, 336, 336), np.float32))
    with pytest.raises(RuntimeInputError, match="text-only"):
        engine.encode_images(np.zeros((1, 3, 336, 336), np.float32))
    assert engine.logits(ids).shape == (1, 3, 256)


def test_export_hf_writes_a_multimodal_checkpoint(built, tmp_path):
    """export-hf of a vision build: Llama4ForConditionalGeneration.from_pretrained loads it, with the same
    image features and logits; import-hf of its config gives back the spec."""
    from transformers import Llama4ForConditionalGeneration
    from l4compile.hf.export import export_from_build
    model, spec, _, engine = built
    export_from_build(engine.directory, tmp_path / "export")
    loaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    loaded.config._attn_implementation = loaded.language_model.config._attn_implementation = "eager"
    config, file = load_hf_config(tmp_path / "export")
    assert spec_from_hf_config(config, "mm", str(file)) == spec
    rng = np.random.default_rng(11)
    ids = prompt(rng, [2], tokens_per_tile(spec.vision))[None]
    pixels = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    np.testing.assert_allclose(reference_logits(loaded, ids, pixels), reference_logits(model, ids, pixels),
                               atol=1e-5, rtol=0)
