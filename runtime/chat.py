"""Chat templates: the checkpoint's Jinja template, rendered the way transformers' `apply_chat_template` does.

Same environment (jinja2's immutable sandbox, `trim_blocks`, `lstrip_blocks`, the loop-controls
extension, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, sandboxed `dict`
and `namespace`), same variables (`messages`, `tools`, `documents`, `add_generation_prompt` and every
named special token: `bos_token`, `eos_token`, ...), same treatment of messages (keys whose value is
None are dropped; the rendered text is tokenized without adding special tokens).
See transformers/utils/chat_template_utils.py (`_cached_compile_jinja_template`, `render_jinja_template`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

from l4compile.runtime.errors import RuntimeInputError

# The roles of Llama 4's prompt format ("tool" is rendered as "ipython"); `ChatTemplate(roles=...)` changes them.
ROLES = ("system", "user", "assistant", "tool", "ipython")


class TemplateError(RuntimeInputError):
    """A chat template that does not compile, or that refuses a conversation (its raise_exception)."""


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` without the type itself (no attribute access into CPython)."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed attributes."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON-like data; any other object becomes an inert "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, bool, int, float):   # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", ()) == ():   # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template and the special tokens it sees."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], roles: Sequence[str] | None = ROLES) -> None:
        import jinja2
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.roles = tuple(roles) if roles is not None else None
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"the chat template does not compile: {exc.message} (template line {exc.lineno})") \
                from None

    def check_messages(self, messages: Any) -> list[dict[str, Any]]:
        """A conversation: a non-empty list of {"role": str, "content": str or a list of parts}."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise RuntimeInputError("a chat is a non-empty list of messages like {'role': 'user', 'content': 'Hi'}")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise RuntimeInputError(f"message {i}: expected a dict with 'role' and 'content', "
                                        f"got {type(message).__name__}")
            role = message.get("role")
            if not isinstance(role, str):
                raise RuntimeInputError(f"message {i}: 'role' must be a string, got {role!r}")
            if self.roles is not None and role not in self.roles:
                raise RuntimeInputError(f"message {i}: unknown role {role!r}; expected one of {', '.join(self.roles)}")
            content = message.get("content")
            tool_call = content is None and message.get("tool_calls")
            if not isinstance(content, (str, list, tuple, Mapping)) and not tool_call:
                raise RuntimeInputError(f"message {i}: 'content' must be a string, a list of parts or (a tool "
                                        f"result) a dict, got {type(content).__name__}")
        # like transformers, drop the keys whose value is None (templates handle a missing key, not None)
        return [_plain({k: v for k, v in m.items() if v is not None}) for m in messages]

    def render(self, messages: Any, add_generation_prompt: bool = True, tools: list | None = None,
               documents: list | None = None, **variables: Any) -> str:
        """The prompt text of a conversation; `variables` reach the template (and override special tokens)."""
        import jinja2
        chat = self.check_messages(messages)
        try:
            return self._template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **_plain(variables)})
        except jinja2.TemplateError as exc:   # raise_exception, undefined attributes, sandbox refusals
            raise TemplateError(f"the chat template refused this conversation: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise TemplateError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") \
                from None
