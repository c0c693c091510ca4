"""A request's prompt as token ids (and image features): the build's tokenizer, chat template and vision model.

Chat image parts (`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`) reach the
template as `{"type": "image"}` parts, which Llama 4's template renders as an `<|image|>` placeholder;
each placeholder is then expanded with its image's tile tokens and the image encoded by the build's
vision model (`Engine.prepare_chat`, `Engine.encode_images`). Only `data:` URLs: the server fetches nothing.
Runs in a worker thread, apart from the scheduler.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from l4compile.errors import L4Error
from l4compile.serve.errors import ApiError
from l4compile.serve.schema import ChatRequest, CompletionRequest

class Prompts:
    def __init__(self, engine) -> None:
        self.engine = engine

    def of(self, params: ChatRequest | CompletionRequest) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids [seq], image features [n, hidden] or None); a bad prompt is an ApiError naming the field."""
        field = "messages" if isinstance(params, ChatRequest) else "prompt"
        try:
            return self._chat(params) if isinstance(params, ChatRequest) else (self._completion(params), None)
        except L4Error as exc:   # too long, a template that refuses the conversation, ids outside the vocabulary
            raise ApiError(400, str(exc), field) from None

    def _completion(self, params: CompletionRequest) -> np.ndarray:
        prompt = params.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.engine.encode_prompt(prompt)
        return self.engine.check_ids(np.asarray(prompt, dtype=np.int64)[None])[0]

    def _chat(self, params: ChatRequest) -> tuple[np.ndarray, np.ndarray | None]:
        images, messages = [], []
        for i, message in enumerate(params.messages):
            item = message.model_dump(exclude_none=True)
            if isinstance(message.content, list):
                item["content"] = []
                for j, part in enumerate(message.content):
                    if part.type == "image_url":
                        images.append(self._image(part.image_url.url, f"messages[{i}].content[{j}]"))
                        item["content"].append({"type": "image"})
                    else:
                        item["content"].append(part.model_dump())
            messages.append(item)
        ids, pixel_values = self.engine.prepare_chat(messages, images=images)   # Llama4Processor's ids
        return ids, None if pixel_values is None else self.engine.encode_images(pixel_values)

    def _image(self, url: str, where: str):
        if self.engine.vision is None:
            raise ApiError(400, "this model is text-only (its build has no vision model): it takes no images", where)
        if not url.startswith("data:") or "," not in url:
            raise ApiError(400, "images are taken as data: URLs (data:image/png;base64,...); the server fetches "
                                "nothing", f"{where}.image_url.url")
        header, data = url[5:].split(",", 1)
        try:
            raw = base64.b64decode(data, validate=True) if header.endswith(";base64") else data.encode()
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image's data: URL is not valid base64", f"{where}.image_url.url") from None
        try:
            from PIL import Image
        except ImportError:
            raise ApiError(400, "this server cannot read image files: it needs Pillow (pip install "
                                "'l4compile[vision]')", where) from None
        try:
            image = Image.open(io.BytesIO(raw))
            image.load()
        except Exception as exc:   # Pillow raises many types for a damaged or unknown file
            raise ApiError(400, f"the image cannot be read ({type(exc).__name__}: {exc})",
                           f"{where}.image_url.url") from None
        return image
