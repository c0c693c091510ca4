"""The request bodies of the OpenAI API that the server speaks, as pydantic models.

Validation is declarative and strict (no "10" for 10, no true for 1): a bad body is a 400 whose `param`
names the field (`param_of`). Fields that would change what is generated but are not supported here
(n > 1, logprobs, tools, ...) are refused by name rather than ignored; harmless ones (user,
frequency_penalty 0, ...) are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

SEED_MAX = 2**64 - 1
MAX_STOP_STRINGS = 16


# field -> (whether a value asks for what this server does not do, the message refusing it); a field of any
# request body (ChatRequest: tools; CompletionRequest: echo, suffix, best_of), checked after its type
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v != 1, "only n=1 is supported (one choice per request)"),
    "presence_penalty": (bool, "penalties are not supported (leave it out or 0)"),
    "frequency_penalty": (bool, "penalties are not supported (leave it out or 0)"),
    "logprobs": (lambda v: v not in (None, False), "logprobs are not supported"),
    "logit_bias": (bool, "logit_bias is not supported"),
    "tools": (bool, "tool calling is not supported"),
    "echo": (bool, "echo is not supported"),
    "suffix": (bool, "suffix is not supported"),
    "best_of": (lambda v: v not in (None, 1), "only best_of=1 is supported"),
}


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class GenerationParams(StrictModel):
    """What both endpoints share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None

    @field_validator(*UNSUPPORTED, check_fields=False)   # also the subclasses' fields
    @classmethod
    def _supported(cls, value, info: ValidationInfo):
        asks_for_more, message = UNSUPPORTED[info.field_name]
        if asks_for_more(value):
            raise ValueError(message)
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: str
    detail: str | None = None


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(StrictModel):
    role: Literal["system", "user", "assistant", "tool", "ipython"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(GenerationParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None


class CompletionRequest(GenerationParams):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("one prompt per request (a string, a list of one string, or token ids)")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value


# pydantic's location segments that name a member of a union, not a field
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "text", "image_url"}


def describe(error: ValidationError) -> tuple[str, str]:
    """(param, message) of a validation error; of a union's members, the error of the one that got furthest."""
    first = max(error.errors(), key=lambda e: len(e["loc"]))
    param = param_of(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return param, f"{param}: {message}" if param else message


def param_of(loc: tuple) -> str:
    """A pydantic error location as OpenAI's `param`: ("messages", 0, "content") -> "messages[0].content"."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "-" in part or (i and part in _UNION_TAGS and not _field_after(loc, i)):
            continue
        else:
            out += ("." if out else "") + part
    return out


def _field_after(loc: tuple, i: int) -> bool:
    """Whether loc[i] is a field name (followed by more, as image_url.url) rather than a union tag."""
    return loc[i] == "image_url" and i + 1 < len(loc) and loc[i + 1] in ("url", "detail")
