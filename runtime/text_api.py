"""The Engine's text methods: prompts and chats in, text out, over the build's tokenizer and chat template.

A mixin of `Engine` (runtime/engine.py): everything here goes through the token-id API
(`stream`, `generate`), so every backend speaks text. The tokenizer and template are loaded on
first use: an app that only passes ids never imports `tokenizers` or `jinja2`.

Defaults come from the build (the checkpoint's generation_config.json): stop tokens, sampling
(greedy unless it says `do_sample`), `max_new_tokens`; an argument overrides each.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from l4compile.runtime.errors import BuildDirError, RuntimeInputError

DEFAULT_MAX_NEW_TOKENS = 256
TEXT_FILES_HINT = ("rebuild with `--tokenizer DIR` (a directory holding the checkpoint's tokenizer.json, "
                   "tokenizer_config.json and generation_config.json)")


class TextGeneration:
    """Text methods of an Engine; needs `manifest`, `directory`, `max_context`, `stream`, `generate`, `vision`
    and `prepare_images`."""

    _tokenizer = None
    _chat_template = None

    # ---- the build's text files --------------------------------------------
    @property
    def text_settings(self) -> dict[str, Any]:
        return self.manifest.text or {}

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer" in self.manifest.files

    @property
    def tokenizer(self):
        """The build's tokenizer (runtime/text.py), loaded once."""
        if self._tokenizer is None:
            from l4compile.runtime.text import load_tokenizer
            if "tokenizer" not in self.manifest.files:
                raise BuildDirError(f"{self.directory}: this build has no tokenizer, so it takes token ids only; "
                                    + TEXT_FILES_HINT)
            files = self._text_files()
            if not files["tokenizer"].is_file():
                raise BuildDirError(f"{self.directory}: tokenizer file {self.manifest.files['tokenizer']} is missing")
            self._tokenizer = load_tokenizer(files)
        return self._tokenizer

    def _text_files(self) -> dict:
        """role -> path of the text files the build carries (runtime/text.py's TEXT_FILES roles)."""
        from l4compile.runtime.text import TEXT_FILES
        return {role: self.directory / self.manifest.files[role] for role in TEXT_FILES if role in self.manifest.files}

    @property
    def chat_template(self):
        """The build's chat template (runtime/chat.py), compiled once."""
        if self._chat_template is None:
            from l4compile.runtime.chat import ChatTemplate
            from l4compile.runtime.text import chat_template_source
            tokenizer = self.tokenizer
            source = chat_template_source(self._text_files(), tokenizer)
            if source is None:
                raise BuildDirError(f"{self.directory}: the build's tokenizer has no chat template; use complete() "
                                    "for plain text, or rebuild with `--tokenizer DIR` from an instruct checkpoint")
            self._chat_template = ChatTemplate(source, tokenizer.special_tokens)
        return self._chat_template

    # ---- prompts -> ids ------------------------------------------------------
    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Text -> ids [seq], as transformers' `tokenizer(text)` (BOS where the tokenizer adds it)."""
        return self._checked_prompt(self.tokenizer.encode(text, add_special_tokens), "prompt")

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **variables: Any) -> np.ndarray:
        """A conversation -> ids [seq], as transformers' `apply_chat_template(messages, add_generation_prompt=...)`."""
        text = self.render_chat(messages, add_generation_prompt, **variables)
        return self._checked_prompt(self.tokenizer.encode(text, add_special_tokens=False), "chat")

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        return self.chat_template.render(messages, add_generation_prompt, **variables)

    # ---- prompts with images (a vision build) -----------------------------------
    def prepare_prompt(self, text: str, images: Sequence[Any] | None = None,
                       add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Text with one `<|image|>` per image, and the images (paths, PIL images or arrays [H, W, 3]) -> (ids [seq],
        pixel_values [tiles, C, S, S] or None): the ids of transformers' `Llama4Processor(text=text, images=images)`.
        Text without `<|image|>` gets the images at its start (after BOS)."""
        from l4compile.runtime.image_prompts import IMAGE_PLACEHOLDER
        images = list(images or [])
        if images and IMAGE_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER * len(images) + text
        return self._with_images(self.encode_prompt(text, add_special_tokens), images, "prompt")

    def prepare_chat(self, messages: Sequence[dict], images: Sequence[Any] | None = None,
                     add_generation_prompt: bool = True, **variables: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """A conversation whose content parts may be images (`{"type": "image", "image": PATH}`, or bare
        `{"type": "image"}` parts with `images=[...]` in order) -> (ids [seq], pixel_values or None): the ids of
        transformers' `Llama4Processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`."""
        from l4compile.runtime.image_prompts import chat_images, images_for_placeholders
        found = chat_images(messages)
        if self.vision is None and images is None:   # a text-only build renders bare image parts as text
            found = [image for image in found if image is not None]
        images = images_for_placeholders(found, images)
        return self._with_images(self.encode_chat(messages, add_generation_prompt, **variables), images, "chat")

    def _with_images(self, ids: np.ndarray, images: list[Any], what: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Each `<|image|>` token of ids replaced by its image's tokens; the images' tiles."""
        if not images:
            if self.vision is not None and self._image_placeholders(ids):
                raise RuntimeInputError(f"the {what} has {self._image_placeholders(ids)} image placeholders "
                                        f"(<|image|>) but no images were given")
            return ids, None
        expanded, pixels = self.prepare_images(ids, images)   # a text-only build says it takes no images
        return self._checked_prompt(expanded[0].tolist(), f"{what} with its images"), pixels

    def _image_placeholders(self, ids: np.ndarray) -> int:
        from l4compile.runtime.image_prompts import IMAGE_PLACEHOLDER
        placeholder = self.tokenizer.token_id(IMAGE_PLACEHOLDER)
        return 0 if placeholder is None else int((ids == placeholder).sum())

    def _checked_prompt(self, ids: list[int], what: str) -> np.ndarray:
        if not ids:
            raise RuntimeInputError(f"the {what} is empty after tokenization")
        if len(ids) >= self.max_context:
            raise RuntimeInputError(f"the {what} is {len(ids)} tokens; the model's context is {self.max_context} "
                                    "(prompt and new tokens together)")
        return np.asarray(ids, dtype=np.int64)

    # ---- generation settings ---------------------------------------------------
    def _text_options(self, prompt_length: int, max_new_tokens: int | None, temperature: float | None,
                  top_k: int | None, top_p: float | None, stop_tokens: Sequence[int] | None) -> dict[str, Any]:
        defaults = self.text_settings.get("sampling") or {}
        if max_new_tokens is None:
            wanted = self.text_settings.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
            max_new_tokens = max(0, min(wanted, self.max_context - prompt_length))
        if stop_tokens is None:
            stop_tokens = self.default_stop_tokens
        return {"max_new_tokens": max_new_tokens, "stop_tokens": tuple(int(t) for t in stop_tokens),
                "temperature": defaults.get("temperature", 0.0) if temperature is None else temperature,
                "top_k": defaults.get("top_k", 0) if top_k is None else top_k,
                "top_p": defaults.get("top_p", 1.0) if top_p is None else top_p}

    def _token_stream(self, ids: np.ndarray, seed: int | None, settings: dict[str, Any],
                      pixel_values: np.ndarray | None = None) -> Iterator[int]:
        """New tokens of one prompt, without the stop token that ends them."""
        stops = set(settings["stop_tokens"])
        for token in self.stream(ids, seed=seed, pixel_values=pixel_values, **settings):
            if token in stops:
                return
            yield token

    def _text_stream(self, ids: np.ndarray, seed: int | None, settings: dict[str, Any],
                     pixel_values: np.ndarray | None = None,
                     on_token: Callable[[int], None] | None = None) -> Iterator[str]:
        tokens = self._token_stream(ids, seed, settings, pixel_values)
        decoder = self.tokenizer.stream_decoder()
        for token in tokens:
            if on_token is not None:
                on_token(token)
            piece = decoder.step(token)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail

    # ---- the text API ----------------------------------------------------------
    def complete_stream(self, prompt: str, max_new_tokens: int | None = None, *, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        stop_tokens: Sequence[int] | None = None, images: Sequence[Any] | None = None,
                        on_token: Callable[[int], None] | None = None) -> Iterator[str]:
        """Continue `prompt`; yields text pieces as they become final (they concatenate to `complete`'s text).
        A vision build takes `images` (paths, PIL images or arrays), placed at the prompt's `<|image|>`s
        (`prepare_prompt`). `on_token` hears of each new token id as it is decided (a progress count)."""
        ids, pixels = self.prepare_prompt(prompt, images)
        return self._text_stream(ids, seed, self._text_options(len(ids), max_new_tokens, temperature, top_k, top_p,
                                                            stop_tokens), pixels, on_token)

    def complete(self, prompt: str, max_new_tokens: int | None = None, **options: Any) -> str:
        """Continue `prompt`: the generated text (special tokens and the stop token left out)."""
        return "".join(self.complete_stream(prompt, max_new_tokens, **options))

    def chat_stream(self, messages: Sequence[dict], max_new_tokens: int | None = None, *,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                    template_variables: dict[str, Any] | None = None,
                    images: Sequence[Any] | None = None,
                    on_token: Callable[[int], None] | None = None) -> Iterator[str]:
        """The assistant's answer to `messages` ([{"role": ..., "content": ...}, ...]), as streamed text pieces.
        A vision build takes image parts in the messages (`prepare_chat`). `on_token`: as in `complete_stream`."""
        ids, pixels = self.prepare_chat(messages, images, True, **(template_variables or {}))
        return self._text_stream(ids, seed, self._text_options(len(ids), max_new_tokens, temperature, top_k, top_p,
                                                            stop_tokens), pixels, on_token)

    def chat(self, messages: Sequence[dict], max_new_tokens: int | None = None, **options: Any) -> str:
        """The assistant's answer to `messages`, rendered with the build's chat template."""
        return "".join(self.chat_stream(messages, max_new_tokens, **options))

    def generate_text(self, prompts: Sequence[str] | Sequence[Sequence[dict]], max_new_tokens: int | None = None, *,
                      temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                      seed: int | None = None, stop_tokens: Sequence[int] | None = None) -> list[str]:
        """A batch: each prompt is a string (completed) or a list of messages (answered); returns their texts.

        The prompts run as one ragged batch (`generate` with a list of 1-D prompts); each row's text equals
        that prompt generated alone (with a seed, every row samples from its own generator of that seed).
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise RuntimeInputError("generate_text takes a non-empty list of prompts (strings or message lists)")
        rows = [self.encode_prompt(p) if isinstance(p, str) else self.encode_chat(p) for p in prompts]
        settings = self._text_options(max(len(r) for r in rows), max_new_tokens, temperature, top_k, top_p,
                                      stop_tokens)
        stops = set(settings["stop_tokens"])
        texts = []
        for ids in self._new_tokens_of_rows(rows, seed, settings):
            new = []
            for token in ids.tolist():
                if token in stops:
                    break
                new.append(token)
            texts.append(self.tokenizer.decode(new))
        return texts

    def _new_tokens_of_rows(self, rows: list[np.ndarray], seed: int | None,
                            settings: dict[str, Any]) -> list[np.ndarray]:
        """The new tokens of each prompt: one ragged `generate` call (a list of 1-D prompts of any lengths)."""
        return [out[len(ids):] for ids, out in zip(rows, self.generate(rows, seed=seed, **settings))]
