"""A checkpoint written by transformers, imported, built and run: onnxruntime (Engine.logits), our torch
module (GraphModule) and transformers agree to 1e-4 on fp32 logits, batch 2, 40 tokens (chunk 8,
temperature floor_scale 4), over configs that exercise every field of the import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from l4compile.build import BuildOptions, build
from l4compile.emit.torch_module import GraphModule
from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
from l4compile.lower import lower
from l4compile.runtime import Engine
from tests.hf.conftest import causal_lm, edit_config, hf_logits, ids_for, multimodal, save

ATOL = 1e-4
# llama3 scaling with head_dim 8: wavelengths 6.3 (kept), 63 (smoothed: between 64/4 and 64/1), 628 and
# 6283 (divided by the factor); every band of the formula is used.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def to_legacy_rope(config: dict) -> None:
    """The pre-5.0 layout: rope_scaling + rope_theta, no layer_types, an empty no_rope_layers."""
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    config.pop("layer_types")
    config["no_rope_layers"] = []


CASES = {
    # every layer MoE, qk norm, llama3 rope, GQA 2 (4 heads over 2 KV heads), NoPE layer 3
    "scout-like": dict(interleave_moe_layer_step=1, use_qk_norm=True, rope_parameters=LLAMA3),
    # MoE every 2nd layer, dense between, no qk norm, GQA 4
    "maverick-like": dict(interleave_moe_layer_step=2, use_qk_norm=False, num_key_value_heads=1),
    # explicit lists that no interval/step generates, multi-head attention (GQA 1), tied embeddings, top-2
    "explicit-lists": dict(num_hidden_layers=5, moe_layers=[0, 3], no_rope_layers=[1, 0, 1, 0, 1],
                           num_key_value_heads=4, tie_word_embeddings=True, num_experts_per_tok=2),
    # layer_types all full_attention: RoPE layers attend globally; all dense; no temperature tuning
    "global-dense": dict(moe_layers=[], layer_types=["full_attention"] * 4, attn_temperature_tuning=False),
    # the transformers 4.x config layout, read back by transformers 5 and by us
    "legacy-rope-config": dict(rope_parameters=LLAMA3, edit=to_legacy_rope),
}


def three_way(checkpoint, reference, tmp_path, attn: str = "eager") -> dict:
    """Import the checkpoint's config, build it, and compare all three on the same ids."""
    config, file = load_hf_config(checkpoint)
    spec = spec_from_hf_config(config, "parity", str(file))
    build(spec, tmp_path / "build", HFCheckpoint.for_spec(checkpoint, spec), BuildOptions(), log=lambda _: None)
    # no image token in a text prompt (id 95 of a multimodal model): the engine would ask for its image
    ids = ids_for(spec.vocab_size - (spec.tokens.image is not None))
    onnx_logits = Engine.load(tmp_path / "build").logits(ids)
    graph = lower(spec, kv_cache=False)
    no_images = [torch.zeros(0, spec.hidden_size)] if "image_features" in graph.inputs else []
    with torch.no_grad():
        torch_logits = GraphModule(graph, HFCheckpoint(checkpoint))(torch.from_numpy(ids), *no_images).numpy()
    theirs = hf_logits(reference, ids, attn)
    assert np.abs(theirs).max() > 0.5  # non-trivial logits
    np.testing.assert_allclose(torch_logits, theirs, atol=ATOL, rtol=0)
    np.testing.assert_allclose(onnx_logits, theirs, atol=ATOL, rtol=0)
    return {"spec": spec, "ids": ids, "logits": onnx_logits}


@pytest.mark.parametrize("case", list(CASES))
def test_text_checkpoint_parity(case, tmp_path):
    from transformers import Llama4ForCausalLM
    overrides = dict(CASES[case])
    edit = overrides.pop("edit", None)
    checkpoint = save(causal_lm(seed=len(case), **overrides), tmp_path / "hf")
    if edit is not None:
        edit_config(checkpoint, edit)
    reference = Llama4ForCausalLM.from_pretrained(checkpoint).eval()  # reads the edited config too
    three_way(checkpoint, reference, tmp_path)


def test_spec_of_each_case_has_the_expected_pattern(tmp_path):
    """The parity cases really cover what they claim (a mis-import could still pass a weak test)."""
    specs = {}
    for case in ("explicit-lists", "global-dense"):
        overrides = {k: v for k, v in CASES[case].items() if k != "edit"}
        config = causal_lm(**overrides).config.to_dict()
        specs[case] = spec_from_hf_config(config, case)
    lists = specs["explicit-lists"]
    assert lists.nope_layers == (1, 3) and lists.moe_layers == (0, 3) and lists.tie_word_embeddings
    assert lists.moe.top_k == 2 and lists.attention.kv_groups == 1
    assert [layer.attention for layer in lists.layers] == ["chunked", "global", "chunked", "global", "chunked"]
    dense = specs["global-dense"]
    assert dense.attention.chunk_size is None and dense.moe_layers == () and dense.nope_layers == (3,)
    assert dense.attention.temperature_tuning is None and dense.layers[0].rope


def test_sdpa_attention_parity(tmp_path):
    model = causal_lm(seed=3, interleave_moe_layer_step=2, num_key_value_heads=1)
    three_way(save(model, tmp_path / "hf"), model, tmp_path, attn="sdpa")


def test_multimodal_checkpoint_parity(tmp_path):
    """Llama4ForConditionalGeneration: `language_model.` names, vision tensors left to the vision
    tower, the vision config carried in the spec; text logits equal the full model's."""
    model = multimodal(seed=5, rope_parameters=LLAMA3)
    result = three_way(save(model, tmp_path / "hf"), model, tmp_path)
    vision = result["spec"].vision
    assert vision is not None and vision.hidden_size == 16 and vision.num_layers == 1
    assert result["spec"].tokens.image == 95


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_builds_in_float32(dtype, tmp_path):
    """bf16/fp16 tensors are converted exactly; transformers loads the same file in float32."""
    from transformers import Llama4ForCausalLM
    checkpoint = save(causal_lm(seed=11).to(dtype), tmp_path / "hf")
    reference = Llama4ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    three_way(checkpoint, reference, tmp_path)


def test_sharded_checkpoint_parity(tmp_path):
    model = causal_lm(seed=12, interleave_moe_layer_step=2)
    checkpoint = save(model, tmp_path / "hf", max_shard_size="40KB")
    assert (checkpoint / "model.safetensors.index.json").is_file()
    assert len(list(checkpoint.glob("*.safetensors"))) > 2
    three_way(checkpoint, model, tmp_path)


def test_cli_import_build_run_matches_transformers(tmp_path):
    """The issue's three commands, as a user types them."""
    model = causal_lm(seed=13, rope_parameters=LLAMA3)
    checkpoint = save(model, tmp_path / "hf-checkpoint")
    spec_file, out = tmp_path / "specs" / "my-model.yaml", tmp_path / "build" / "my-model"
    for args in (["import-hf", checkpoint, "-o", spec_file],
                 ["build", spec_file, "--target", "onnx", "--weights", checkpoint, "-o", out]):
        r = subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert "import-hf" in spec_file.read_text().splitlines()[0]
    ids = ids_for(96)
    np.testing.assert_allclose(Engine.load(out).logits(ids), hf_logits(model, ids), atol=ATOL, rtol=0)
