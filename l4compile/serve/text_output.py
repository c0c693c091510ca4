"""A request's generated text: detokenized as it streams, cut at the first stop string.

Text that could still turn out to begin a stop string is held back until it cannot, so a client never
receives part of a stop string (OpenAI's `stop`: the text ends before it, and it is not returned).
"""

from __future__ import annotations


class TextOutput:
    """Token ids in (`add`), final text pieces out; `finish` flushes what is held at the end."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.held = ""

    def add(self, token: int) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the text)."""
        return self._push(self.decoder.step(token), final=False)

    def finish(self) -> str:
        """The rest of the text when generation ends for another reason (stop token, length)."""
        return self._push(self.decoder.finish(), final=True)[0]

    def _push(self, new: str, final: bool) -> tuple[str, bool]:
        text = self.held + new
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = 0 if final else _partial_stop(text, self.stop_strings)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
