"""The tokenizer files a build carries: found in a checkpoint (or `build --tokenizer DIR`), checked, copied.

The runtime reads them (runtime/text.py, runtime/chat.py); the manifest lists them in `files` and
records, in `text`, what the checkpoint's generation_config.json says about generation: the stop
tokens and the default sampling settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from l4compile.errors import BuildError

# role in manifest.files -> the file names a Hugging Face checkpoint uses for it (first found wins)
TOKENIZER_FILES = {
    "tokenizer": ("tokenizer.json",),
    "tokenizer_config": ("tokenizer_config.json",),
    "chat_template": ("chat_template.jinja", "chat_template.json"),
    "special_tokens_map": ("special_tokens_map.json",),
    "generation_config": ("generation_config.json",),
}


def find_tokenizer(directory: str | Path) -> dict[str, Path]:
    """role -> file of a directory that holds a Hugging Face fast tokenizer (tokenizer.json)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildError(f"--tokenizer {directory}: not a directory")
    found = {role: next((directory / n for n in names if (directory / n).is_file()), None)
             for role, names in TOKENIZER_FILES.items()}
    if found["tokenizer"] is None:
        raise BuildError(f"--tokenizer {directory}: no tokenizer.json there (l4compile reads Hugging Face fast "
                         "tokenizers; save one with `tokenizer.save_pretrained(DIR)`)")
    return {role: path for role, path in found.items() if path is not None}


def tokenizer_source(tokenizer: str | None, weights: str | None) -> str | None:
    """`--tokenizer DIR` if given; else the `--weights` checkpoint directory when it holds a tokenizer."""
    if tokenizer:
        return tokenizer
    if weights and weights != "random" and (Path(weights) / "tokenizer.json").is_file():
        return weights
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path}: expected a JSON object")
    return data


def generation_settings(path: Path | None) -> dict[str, Any]:
    """What generation_config.json says: stop tokens (eos_token_id), sampling defaults, max_new_tokens.

    As transformers' generate reads it: greedy unless `do_sample`; sampling's temperature and top_p
    default to 1 and top_k to none.
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
    from l4compile.runtime.errors import BuildDirError, RuntimeInputError
    from l4compile.runtime.text import Tokenizer
    try:
        tokenizer = Tokenizer.load(files["tokenizer"], files.get("tokenizer_config"), files.get("special_tokens_map"))
    except BuildDirError as exc:
        raise BuildError(str(exc)) from None
    if tokenizer.vocab_size > vocab_size:
        raise BuildError(f"{files['tokenizer']}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary is {vocab_size}; it is not this model's tokenizer")
    template = None
    if "chat_template" in files:
        path = files["chat_template"]
        template = _read_json(path).get("chat_template") if path.suffix == ".json" else path.read_text("utf-8")
    template = template or tokenizer.config.get("chat_template")
    if isinstance(template, str):
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
