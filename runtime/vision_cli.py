"""`l4compile run --image`: image files into the prompt ids and pixel tiles of a vision build."""

from __future__ import annotations

import numpy as np

from l4compile.runtime.errors import RuntimeInputError
from l4compile.runtime.preprocess import ImageTokens


def image_prompt_ids(engine, prompt_ids: list[int], images: list[str],
                     token_ids: list[int] | None) -> tuple[list[int], np.ndarray]:
    """Each image replaces the next `<|image|>` placeholder of the prompt; without placeholders, the images go
    after the first token (the BOS of a chat prompt). Returns the expanded ids and the pixel tiles."""
    tokens = None
    if token_ids is not None:
        if len(token_ids) != 6:
            raise RuntimeInputError(f"--image-token-ids takes 6 ids (START,END,TILE_X,TILE_Y,IMAGE,PATCH), "
                                    f"got {len(token_ids)}")
        tokens = ImageTokens(*token_ids)
    placeholder = tokens.image if tokens else ((engine.vision.info.get("prompt_tokens") or {}).get("image")
                                               if engine.vision else None)
    ids = list(prompt_ids)
    if placeholder is not None and placeholder not in ids:
        ids = ids[:1] + [placeholder] * len(images) + ids[1:]
    expanded, pixels = engine.prepare_images(np.array(ids), images, tokens)
    return expanded[0].tolist(), pixels
