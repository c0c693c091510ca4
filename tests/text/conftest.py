"""Fixtures of the text tests: a Llama 4-style tokenizer saved beside a random tiny checkpoint, and its build."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.text.llama4_tokenizer import SPECIAL_TOKENS, STOP_TOKENS, model_vocab, save_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer") / "llama4-style")


def token_ids(directory: Path) -> dict[str, int]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama 4 (chunk 8, floor 4) whose vocabulary covers the tokenizer, saved with its tokenizer."""
    from tests.hf.conftest import causal_lm
    ids = token_ids(tokenizer_dir)
    directory = tmp_path_factory.mktemp("hf") / "tiny-text"
    model = causal_lm(seed=3, vocab_size=model_vocab(tokenizer_dir), max_position_embeddings=256,
                      bos_token_id=ids["<|begin_of_text|>"], eos_token_id=[ids[t] for t in STOP_TOKENS],
                      pad_token_id=ids["<|finetune_right_pad|>"])
    model.save_pretrained(directory)
    save_tokenizer(directory)   # writes the tokenizer files and the Llama 4-style generation_config.json
    return directory


@pytest.fixture(scope="session")
def text_build(tmp_path_factory, text_checkpoint) -> Path:
    """The checkpoint built by l4compile: the tokenizer files travel into the build from --weights."""
    from l4compile.build import BuildOptions, build
    from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
    from l4compile.tokenizer_files import tokenizer_source
    config, file = load_hf_config(text_checkpoint)
    spec = spec_from_hf_config(config, "tiny-text", str(file))
    out = tmp_path_factory.mktemp("builds") / "tiny-text"
    build(spec, out, HFCheckpoint.for_spec(text_checkpoint, spec),
          BuildOptions(tokenizer=tokenizer_source(None, str(text_checkpoint))), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def hf_model(text_checkpoint):
    from transformers import Llama4ForCausalLM
    return Llama4ForCausalLM.from_pretrained(text_checkpoint).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(text_checkpoint):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(text_checkpoint)
