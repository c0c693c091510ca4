"""Text in, text out: the build's Hugging Face tokenizer files, read with the `tokenizers` library.

`Tokenizer.load` reads the files a build carries (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) the way transformers' `AutoTokenizer` does for a fast tokenizer: the named
special tokens, tokens the config adds, and (where tokenizer.json has no post-processor) the config's
`add_bos_token` / `add_eos_token`. `StreamDecoder` turns generated ids into text pieces that
are always final: it decodes a small window of recent tokens and emits only the suffix that cannot
change any more (a character split across byte tokens is held until it is complete).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from l4compile.runtime.errors import BuildDirError, RuntimeInputError

# The named special tokens of transformers' tokenizers; each is a variable of the chat template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REPLACEMENT = "\ufffd"   # what a decoder yields for an incomplete UTF-8 sequence
# role (a build's manifest.files) -> the file names a Hugging Face checkpoint uses for it (first found wins)
TEXT_FILES = {
    "tokenizer": ("tokenizer.json",),
    "tokenizer_config": ("tokenizer_config.json",),
    "chat_template": ("chat_template.jinja", "chat_template.json"),
    "special_tokens_map": ("special_tokens_map.json",),
    "generation_config": ("generation_config.json",),
}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildDirError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise BuildDirError(f"{path}: expected a JSON object")
    return data


def find_text_files(directory: str | Path) -> dict[str, Path]:
    """role -> file of the text files (TEXT_FILES) a checkpoint directory holds; the build copies these."""
    directory = Path(directory)
    found = {role: next((directory / n for n in names if (directory / n).is_file()), None)
             for role, names in TEXT_FILES.items()}
    return {role: path for role, path in found.items() if path is not None}


def load_tokenizer(files: Mapping[str, Path]) -> "Tokenizer":
    """The tokenizer of role -> file: `tokenizer`, with `tokenizer_config` and `special_tokens_map` where given."""
    return Tokenizer.load(files["tokenizer"], files.get("tokenizer_config"), files.get("special_tokens_map"))


def chat_template_source(files: Mapping[str, Path], tokenizer: "Tokenizer") -> str | None:
    """The chat template's Jinja source, where transformers' AutoTokenizer finds it: chat_template.jinja, else
    tokenizer_config.json's (of named templates, the "default" one); else a processor's chat_template.json
    ({"chat_template": ...}); None when there is none."""
    path = files.get("chat_template")
    if path is not None and path.suffix == ".jinja" and path.read_text("utf-8"):
        return path.read_text("utf-8")
    source = tokenizer.config.get("chat_template")
    if isinstance(source, list):   # named templates, as tokenizer_config.json may hold them
        source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}.get("default")
    if not source and path is not None:
        source = read_json(path).get("chat_template")
    return source if isinstance(source, str) and source else None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A Hugging Face fast tokenizer and its special tokens, without transformers."""

    def __init__(self, backend, special_tokens: dict[str, str], config: dict[str, Any]) -> None:
        self.backend = backend                  # tokenizers.Tokenizer
        self.special_tokens = special_tokens    # "bos_token" -> "<|begin_of_text|>", ...
        self.config = config                    # tokenizer_config.json
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.byte_run_ids = _byte_run_ids(backend)

    @classmethod
    def load(cls, tokenizer_file: Path, config_file: Path | None = None,
             special_tokens_file: Path | None = None) -> "Tokenizer":
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
            raise BuildDirError(f"{tokenizer_file}: not a tokenizers file ({exc})") from None
        config = read_json(config_file) if config_file and config_file.is_file() else {}
        legacy = read_json(special_tokens_file) if special_tokens_file and special_tokens_file.is_file() else {}
        extra = config.get("extra_special_tokens")
        names = SPECIAL_TOKEN_NAMES + tuple(extra) if isinstance(extra, dict) else SPECIAL_TOKEN_NAMES
        special = {}
        for name in names:
            text = _token_text(config.get(name, (extra or {}).get(name) if isinstance(extra, dict) else None))
            text = text or _token_text(legacy.get(name))
            if text is not None:
                special[name] = text
        added = [AddedToken(_token_text(t), special=bool(t.get("special", True)), lstrip=bool(t.get("lstrip")),
                            rstrip=bool(t.get("rstrip")), normalized=bool(t.get("normalized", False)),
                            single_word=bool(t.get("single_word")))
                 for _, t in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))
                 if isinstance(t, dict) and _token_text(t)]
        vocab = backend.get_vocab(with_added_tokens=True)
        added = [t for t in added if t.content not in vocab]
        missing = [AddedToken(t, special=True, normalized=False) for t in special.values()
                   if t not in vocab and t not in {a.content for a in added}]
        if added or missing:
            backend.add_tokens(added + missing)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        if backend.post_processor is None:   # transformers 5 keeps tokenizer.json's post-processor when it has one
            _set_post_processor(backend, special, bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        return cls(backend, special, config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, as `tokenizer(text)` (with the post-processor's BOS) or `add_special_tokens=False`."""
        if not isinstance(text, str):
            raise RuntimeInputError(f"a prompt must be a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def _byte_run_ids(backend) -> frozenset[int]:
    """The `<0xNN>` tokens of a tokenizer whose decoder has ByteFallback (SentencePiece's layout). It decodes a run of
    them as a whole: its UTF-8 text, or one U+FFFD per byte when the run is not valid UTF-8, so one more byte token
    can turn characters already complete into replacements. Byte-level tokenizers (Llama 4's) have none."""
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return frozenset()
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(i for i in ids if i is not None)


def _set_post_processor(backend, special: dict[str, str], add_bos: bool, add_eos: bool) -> None:
    """transformers' TokenizersBackend.update_post_processor: BOS/EOS from the config's flags."""
    from tokenizers import processors
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    tokens = [(t, backend.token_to_id(t)) for t, add in ((bos, add_bos), (eos, add_eos)) if add]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


class StreamDecoder:
    """Incremental detokenization whose pieces concatenate to `decode(all ids)`.

    The text of a token can depend on its neighbours: byte-level and byte-fallback tokens carry parts
    of one character, and decoders strip or add spaces at the start of a sequence. So each step decodes
    the ids from `prefix` (a few tokens back, already emitted) to the end and emits what that window
    adds beyond the text of its already-read part, unless it ends in an incomplete character; the window
    then moves up. This is the approach of text-generation-inference and tokenizers' DecodeStream, with one
    difference: a run of byte-fallback tokens is held until it ends, since a later byte of the run can turn
    its text into replacement characters (DecodeStream's pieces then differ from the decoded text).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0     # start of the window
        self.read = 0       # end of the part of the window whose text has been emitted
        self.emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Add one token; returns the newly final text ("" while a character is incomplete)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if token_id in self.tokenizer.byte_run_ids:   # the run's text is final once it ends
            return ""
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):   # no text (a byte run goes on across it)
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT) and after.startswith(before):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted.append(piece)
            return piece
        return ""

    def finish(self) -> str:
        """The text not emitted yet (a trailing incomplete character, or any difference from the full decode)."""
        text, done = self._decode(self.ids), "".join(self.emitted)
        piece = text[len(done):] if text.startswith(done) else ""
        self.emitted.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self.emitted)
