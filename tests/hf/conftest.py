"""Fixtures of the Hugging Face tests: tiny random transformers Llama 4 models saved to temp dirs.

Weights are redrawn at O(1) scale (transformers initialises with std 0.02 and unit norms, which
would make every logit nearly 0 and every comparison trivially pass).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

# chunk 8, floor_scale 4: a 40-token prompt crosses five chunks and many temperature floor steps
TINY_TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=16, intermediate_size_mlp=24,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 num_local_experts=4, attention_chunk_size=8, floor_scale=4, max_position_embeddings=256,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                   projector_output_dim=32)
SEQ = 40


def text_config(**overrides):
    from transformers import Llama4TextConfig
    return Llama4TextConfig(**{**TINY_TEXT, **overrides})


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter ~ N(0, 1/fan_in) (norm weights 1 + N(0, 0.1^2), embeddings N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or p.ndim == 1:
                value = 1.0 + 0.1 * noise
            elif "embed" in name:
                value = noise
            else:  # nn.Linear [out, in]; stacked experts [E, in, out]
                value = noise / (p.shape[1] if p.ndim == 3 else p.shape[-1]) ** 0.5
            p.copy_(value.to(p.dtype))
    return model.eval()


def causal_lm(seed: int = 0, **overrides):
    from transformers import Llama4ForCausalLM
    torch.manual_seed(seed)
    return randomize(Llama4ForCausalLM(text_config(**overrides)), seed)


def multimodal(seed: int = 0, vision: dict | None = None, **overrides):
    from transformers import Llama4Config, Llama4ForConditionalGeneration
    config = Llama4Config(text_config=text_config(**overrides).to_dict(), vision_config={**TINY_VISION, **(vision or {})},
                          image_token_index=95)
    torch.manual_seed(seed)
    return randomize(Llama4ForConditionalGeneration(config), seed)


def save(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model, ids: np.ndarray, attn: str = "eager") -> np.ndarray:
    """transformers' logits; of a multimodal model, its language model's (text-only input: transformers
    5.24's Llama4ForConditionalGeneration.forward fails without pixel_values)."""
    model = getattr(model, "language_model", model)
    model.config._attn_implementation = attn
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def ids_for(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)


def edit_config(directory: Path, edit) -> None:
    """Rewrite a saved config.json through `edit(dict)` (which changes it in place)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny text checkpoint (Scout-like: every layer MoE), shared by the error tests."""
    return save(causal_lm(seed=7), tmp_path_factory.mktemp("hf") / "tiny")
