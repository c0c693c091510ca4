"""Images inside text prompts and chats, as transformers' Llama4Processor places them.

A text prompt marks each image with the processor's placeholder `<|image|>` (`fake_image_token`); a chat
message marks it with a content part `{"type": "image"}`, which Llama 4's chat template renders as that
placeholder. The image itself comes with the part (`"image"`: a path, PIL image or array; `"path"`, `"url"`:
a local file; `"base64"`: encoded bytes, as transformers' processor reads them) or, as the processor's
`images=` argument, in a list in order. Each placeholder's token is then replaced by the image's tokens
(runtime/preprocess.py: `expand_prompt`).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping, Sequence

from l4compile.runtime.errors import RuntimeInputError
from l4compile.runtime.preprocess import ImageTokens

IMAGE_PLACEHOLDER = "<|image|>"
# The text of each image prompt token in Llama 4's tokenizer (Llama4Processor's defaults).
TOKEN_TEXTS = {"image_start": "<|image_start|>", "image_end": "<|image_end|>", "tile_x": "<|tile_x_separator|>",
               "tile_y": "<|tile_y_separator|>", "image": IMAGE_PLACEHOLDER, "patch": "<|patch|>"}
PART_IMAGE_KEYS = ("image", "url", "path", "base64")   # where the processor's apply_chat_template looks


def tokens_of(tokenizer) -> ImageTokens | None:
    """The image prompt tokens of a tokenizer that has all six, else None."""
    ids = {field: tokenizer.token_id(text) for field, text in TOKEN_TEXTS.items()}
    return None if any(i is None for i in ids.values()) else ImageTokens(**ids)


def chat_images(messages: Any) -> list[Any]:
    """The images of a conversation's `{"type": "image", ...}` parts, in order; None for a part without one."""
    found: list[Any] = []
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return found   # the chat template's checks say what is wrong
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (str, bytes)) or not isinstance(content, Sequence):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image":
                key = next((k for k in PART_IMAGE_KEYS if part.get(k) is not None), None)
                found.append(None if key is None else _decoded(part[key]) if key == "base64" else part[key])
    return found


def images_for_placeholders(found: list[Any], images: Sequence[Any] | None) -> list[Any]:
    """The images of a chat: `images` where given (they replace the parts' own, as the processor's `images=`
    does), else the parts' images, each part needing one."""
    if images is not None:
        return list(images)
    missing = sum(image is None for image in found)
    if missing:
        raise RuntimeInputError(f"{missing} of the chat's {len(found)} image parts carry no image: give each part an "
                                f"'image' (a path, PIL image or array), 'path', 'url' or 'base64' key, or pass "
                                "images=[...] in order")
    return found


def _decoded(data: Any) -> Any:
    """A base64 image part (optionally a data: URL) as a PIL image."""
    if not isinstance(data, (str, bytes)):
        raise RuntimeInputError(f"a base64 image part must be a string, got {type(data).__name__}")
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise RuntimeInputError("a base64 image part is not valid base64") from None
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeInputError("reading image files needs Pillow: pip install 'l4compile[vision]'") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (OSError, ValueError) as exc:
        raise RuntimeInputError(f"a base64 image part is not an image Pillow reads: {exc}") from None
    return image
