"""The tokenizer files a build carries: found in a checkpoint (or `build --tokenizer DIR`), checked, copied.

Which files, and how they are read, is the runtime's (runtime/text.py: TEXT_FILES, `find_text_files`,
`load_tokenizer`, `chat_template_source`), so a build checks exactly what the runtime will load. The manifest
lists them in `files` and records, in `text`, what the checkpoint's generation_config.json says about
generation: the stop tokens and the default sampling settings.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from l4compile.errors import BuildError
from l4compile.runtime.errors import BuildDirError
from l4compile.runtime.text import find_text_files, read_json


def find_tokenizer(directory: str | Path) -> dict[str, Path]:
    """role -> file of a directory that holds a Hugging Face fast tokenizer (tokenizer.json)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildError(f"--tokenizer {directory}: not a directory")
    found = find_text_files(directory)
    if "tokenizer" not in found:
        raise BuildError(f"--tokenizer {directory}: no tokenizer.json there (l4compile reads Hugging Face fast "
                         "tokenizers; save one with `tokenizer.save_pretrained(DIR)`)")
    return found


def tokenizer_source(tokenizer: str | None, weights: str | None) -> str | None:
    """`--tokenizer DIR` if given; else the `--weights` checkpoint directory when it holds a tokenizer."""
    if tokenizer:
        return tokenizer
    if weights and weights != "random" and "tokenizer" in find_text_files(weights):
        return weights
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except BuildDirError as exc:
        raise BuildError(str(exc)) from None


def generation_settings(path: Path | None) -> dict[str, Any]:
    """What generation_config.json says: stop tokens (eos_token_id), sampling defaults, max_new_tokens.

    Greedy unless `do_sample`, as transformers' generate reads it; sampling's temperature and top_p default to 1
    and top_k to no limit where the file names none (as vLLM does; transformers would apply its global top_k 50).
    """
    if path is None:
        return {}
    config = _read_json(path)
    settings: dict[str, Any] = {}
    eos = config.get("eos_token_id")
    if eos is not None:
        eos = [eos] if isinstance(eos, int) else eos
        if not (isinstance(eos, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in eos)):
            raise BuildError(f"{path}: eos_token_id must be a token id or a list of them, "
                             f"found {config['eos_token_id']!r}")
        settings["stop_tokens"] = eos
    if config.get("do_sample"):
        settings["sampling"] = {"temperature": float(config.get("temperature") or 1.0),
                                "top_k": int(config.get("top_k") or 0), "top_p": float(config.get("top_p") or 1.0)}
    else:
        settings["sampling"] = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    if isinstance(config.get("max_new_tokens"), int):
        settings["max_new_tokens"] = config["max_new_tokens"]
    return settings


def check_tokenizer(files: dict[str, Path], vocab_size: int) -> None:
    """Load the tokenizer and compile its chat template as the runtime will, so a bad file fails the build."""
    from l4compile.runtime.errors import RuntimeInputError
    from l4compile.runtime.text import chat_template_source, load_tokenizer
    try:
        tokenizer = load_tokenizer(files)
    except BuildDirError as exc:
        raise BuildError(str(exc)) from None
    if tokenizer.vocab_size > vocab_size:
        raise BuildError(f"{files['tokenizer']}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary is {vocab_size}; it is not this model's tokenizer")
    try:
        template = chat_template_source(files, tokenizer)
    except BuildDirError as exc:
        raise BuildError(str(exc)) from None
    if template is not None:
        from l4compile.runtime.chat import ChatTemplate
        try:
            ChatTemplate(template, tokenizer.special_tokens)
        except RuntimeInputError as exc:
            raise BuildError(f"{files.get('chat_template', files.get('tokenizer_config'))}: {exc}") from None


def prepare_tokenizer(directory: str | Path, vocab_size: int) -> dict[str, Path]:
    """The tokenizer files of `directory`, checked (before a build spends time on weights)."""
    files = find_tokenizer(directory)
    check_tokenizer(files, vocab_size)
    generation_settings(files.get("generation_config"))
    return files


def copy_tokenizer(files: dict[str, Path], out_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Copy the files into a build being written: (role -> file name for manifest.files, manifest.text)."""
    for path in files.values():
        shutil.copyfile(path, out_dir / path.name)
    return {role: path.name for role, path in files.items()}, generation_settings(files.get("generation_config"))
