"""Greedy generation of the runtime equals transformers' generate on the same (randomized) weights.

The weights are drawn at O(1) scale (tests/hf/conftest.py: transformers' own std-0.02 init leaves
every greedy token unchanged when temperature tuning is switched off), and the test shows that it
would notice: transformers with temperature tuning off, or without the chunk mask, generates
other tokens from the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l4compile.build import BuildOptions, build
from l4compile.hf import HFCheckpoint, hf_config_from_spec
from l4compile.runtime import Engine
from tests.conftest import load, token_ids
from tests.hf.conftest import randomize

NEW = 40


def hf_generate(spec, state: dict, prompt: np.ndarray, **config_changes) -> np.ndarray:
    """transformers' greedy tokens from these weights, with the spec's config changed as asked."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    model = Llama4ForCausalLM(Llama4TextConfig(**{**hf_config_from_spec(spec), **config_changes})).eval()
    model.load_state_dict(state)
    model.generation_config.eos_token_id = None  # run all steps in both engines
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), max_new_tokens=NEW, do_sample=False,
                             attention_mask=torch.ones_like(torch.from_numpy(prompt)))
    return out.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    spec = load(name)
    torch.manual_seed(1)
    model = randomize(Llama4ForCausalLM(Llama4TextConfig(**hf_config_from_spec(spec))), seed=1)
    model.save_pretrained(tmp_path / "hf")
    build(spec, tmp_path / "build", HFCheckpoint(tmp_path / "hf"), BuildOptions(), log=lambda _: None)

    prompt = token_ids(2, 6, seed=9)   # 6 + 40 tokens: five chunk boundaries (chunk 8), floor steps every 4
    ours = Engine.load(tmp_path / "build").generate(prompt, max_new_tokens=NEW, stop_tokens=())
    state = model.state_dict()
    np.testing.assert_array_equal(ours, hf_generate(spec, state, prompt))
    assert len(set(ours[0, 6:].tolist())) > 3  # a real sequence, not one token repeated
    # the comparison is sensitive to both long-context features: without either, other tokens
    assert not np.array_equal(ours, hf_generate(spec, state, prompt, attn_temperature_tuning=False))
    assert not np.array_equal(ours, hf_generate(spec, state, prompt, attention_chunk_size=spec.max_position_embeddings))
