"""The request schema alone (no server): what it refuses by name, in exactly these words, and what it lets by."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from l4compile.serve.schema import ChatRequest, CompletionRequest, describe

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"prompt": "hi"}


@pytest.mark.parametrize("model, body, message", [
    (ChatRequest, {**CHAT, "n": 2}, "n: only n=1 is supported (one choice per request)"),
    (CompletionRequest, {**PROMPT, "n": 0}, "n: only n=1 is supported (one choice per request)"),
    (ChatRequest, {**CHAT, "presence_penalty": 0.5}, "presence_penalty: penalties are not supported (leave it out or 0)"),
    (CompletionRequest, {**PROMPT, "frequency_penalty": -1.0},
     "frequency_penalty: penalties are not supported (leave it out or 0)"),
    (ChatRequest, {**CHAT, "logprobs": True}, "logprobs: logprobs are not supported"),
    (CompletionRequest, {**PROMPT, "logprobs": 2}, "logprobs: logprobs are not supported"),
    (ChatRequest, {**CHAT, "logit_bias": {"5": 1.0}}, "logit_bias: logit_bias is not supported"),
    (ChatRequest, {**CHAT, "tools": [{"type": "function"}]}, "tools: tool calling is not supported"),
    (CompletionRequest, {**PROMPT, "echo": True}, "echo: echo is not supported"),
    (CompletionRequest, {**PROMPT, "suffix": "end"}, "suffix: suffix is not supported"),
    (CompletionRequest, {**PROMPT, "best_of": 2}, "best_of: only best_of=1 is supported"),
])
def test_unsupported_fields_are_refused_by_name(model, body, message):
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    assert describe(info.value) == (message.split(":")[0], message)


@pytest.mark.parametrize("model, body", [
    (ChatRequest, {**CHAT, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": False,
                   "logit_bias": {}, "tools": [], "user": "u"}),
    (CompletionRequest, {**PROMPT, "n": 1, "logprobs": None, "echo": False, "suffix": "", "best_of": 1}),
    (ChatRequest, {**CHAT, "echo": True, "best_of": 3}),   # fields of the other endpoint are ignored
])
def test_harmless_values_are_accepted(model, body):
    model.model_validate(body)


def test_a_wrong_type_is_refused_before_the_support_check():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({**PROMPT, "echo": "yes"})
    assert describe(info.value)[0] == "echo" and "boolean" in describe(info.value)[1]
