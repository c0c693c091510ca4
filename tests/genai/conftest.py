"""Fixtures of the onnxruntime-genai tests: the text tests' tiny Llama 4 checkpoint (with its tokenizer), built
for genai and for our runtime; genai's generation driven the way an app drives it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.text.conftest import hf_model, hf_tokenizer, text_build, text_checkpoint, tokenizer_dir  # noqa: F401


def build_genai(spec, weights, out: Path, **options) -> Path:
    from l4compile.build import BuildOptions, build
    build(spec, out, weights, BuildOptions(target="ort-genai", **options), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def genai_text_build(tmp_path_factory, text_checkpoint) -> Path:   # noqa: F811
    """The text checkpoint built with --target ort-genai (its tokenizer travels along, as for --target onnx)."""
    from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
    from l4compile.tokenizer_files import tokenizer_source
    config, file = load_hf_config(text_checkpoint)
    spec = spec_from_hf_config(config, "tiny-text", str(file))
    return build_genai(spec, HFCheckpoint.for_spec(text_checkpoint, spec),
                       tmp_path_factory.mktemp("genai") / "tiny-text",
                       tokenizer=tokenizer_source(None, str(text_checkpoint)))


class Genai:
    """An onnxruntime_genai.Model of a build, and the build's genai_config.json."""

    def __init__(self, directory: Path) -> None:
        import json

        import onnxruntime_genai as og
        self.model = og.Model(str(directory))
        self.config = json.loads((Path(directory) / "genai_config.json").read_text())

    @property
    def eos(self) -> set[int]:
        return set(np.atleast_1d(self.config["model"]["eos_token_id"]).tolist())

    def greedy(self, prompts: list[np.ndarray], new_tokens: int) -> list[np.ndarray]:
        """Each prompt followed by genai's greedy tokens (at most `new_tokens`, up to and including an EOS),
        the prompts run as one batch (genai right-pads them; the pads are left out here)."""
        import onnxruntime_genai as og
        width = max(len(p) for p in prompts)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=width + new_tokens, do_sample=False, batch_size=len(prompts))
        generator = og.Generator(self.model, params)
        batch = np.full((len(prompts), width), self.config["model"]["pad_token_id"], dtype=np.int32)
        for row, prompt in enumerate(prompts):
            batch[row, :len(prompt)] = prompt
        generator.append_tokens(batch)
        for _ in range(new_tokens):   # bounded: genai ends at max_length or once every row has hit an EOS
            if generator.is_done():
                break
            generator.generate_next_token()
        return [np.concatenate([prompt, until_stop(np.asarray(generator.get_sequence(row))[width:], self.eos)])
                .astype(np.int64) for row, prompt in enumerate(prompts)]


def until_stop(tokens, stop: set[int]) -> np.ndarray:
    """tokens up to and including the first stop token."""
    tokens = np.asarray(tokens)
    for i, t in enumerate(tokens):
        if int(t) in stop:
            return tokens[:i + 1]
    return tokens
