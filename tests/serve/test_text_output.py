"""Stop strings over streamed text, and error locations as OpenAI's `param` (no model, no server)."""

from __future__ import annotations

import pytest

from l4compile.serve.schema import ChatRequest, describe
from l4compile.serve.text_output import TextOutput


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from l4compile.runtime.text import Tokenizer
    return Tokenizer.load(tokenizer_dir / "tokenizer.json", tokenizer_dir / "tokenizer_config.json")


def run(tokenizer, text: str, stops: tuple[str, ...]) -> tuple[list[str], bool]:
    output, pieces = TextOutput(tokenizer, stops), []
    for token in tokenizer.encode(text, add_special_tokens=False):
        piece, stopped = output.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    pieces.append(output.finish())
    return pieces, False


@pytest.mark.parametrize("text, stops, want, stopped", [
    ("The capital of France is Paris. The capital", ("Paris",), "The capital of France is ", True),
    ("The capital of France is Paris.", ("Tokyo", "France"), "The capital of ", True),
    ("Hello, how are you today?", ("you to", "are"), "Hello, how ", True),
    ("Hello, how are you today?", ("today?!",), "Hello, how are you today?", False),   # a prefix, never whole
    ("東京は日本の首都です。", ("首都",), "東京は日本の", True),
    ("Emoji: 👋 🎉 🚀", ("🎉",), "Emoji: 👋 ", True),
    ("no stops here", (), "no stops here", False),
])
def test_text_ends_before_the_first_stop_string(tokenizer, text, stops, want, stopped):
    pieces, hit = run(tokenizer, text, stops)
    assert ("".join(pieces), hit) == (want, stopped)
    for stop in stops:   # nothing of a stop string was sent before the text was cut
        assert stop not in "".join(pieces)


def test_held_text_is_sent_once_it_cannot_start_a_stop_string(tokenizer):
    output = TextOutput(tokenizer, ("Paris!",))
    sent = "".join(output.add(t)[0] for t in tokenizer.encode("Paris. Paris", add_special_tokens=False))
    assert sent == "Paris. "
    assert output.finish() == "Paris"


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
    ({"messages": [], "max_tokens": 3}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop[0]"),
])
def test_error_locations_name_the_field(body, param):
    from pydantic import ValidationError
    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(body)
    assert describe(info.value)[0] == param
