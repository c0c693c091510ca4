"""Greedy generation of the runtime equals transformers' generate on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l4compile.build import BuildOptions, build
from l4compile.hf import HFCheckpoint, hf_config_from_spec
from l4compile.runtime import Engine
from tests.conftest import load, token_ids


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    spec = load(name)
    torch.manual_seed(1)
    model = Llama4ForCausalLM(Llama4TextConfig(**hf_config_from_spec(spec))).eval()
    model.generation_config.eos_token_id = None  # run all 40 steps in both engines
    model.save_pretrained(tmp_path / "hf")
    build(spec, tmp_path / "build", HFCheckpoint(tmp_path / "hf"), BuildOptions(), log=lambda _: None)

    prompt = token_ids(2, 6, seed=9)   # 6 + 40 tokens: five chunks of 8, temperature floor steps every 4
    ours = Engine.load(tmp_path / "build").generate(prompt, max_new_tokens=40, stop_tokens=())
    with torch.no_grad():
        theirs = model.generate(torch.from_numpy(prompt), max_new_tokens=40, do_sample=False,
                                attention_mask=torch.ones_like(torch.from_numpy(prompt)))
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert len(set(ours[0, 6:].tolist())) > 3  # a real sequence, not one token repeated
