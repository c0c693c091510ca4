"""Typed reading of a PyYAML node tree that remembers where every value came from.

The loader works on `yaml.compose()` nodes rather than on `safe_load()` output so
that every key and value keeps its line number, and duplicate keys (which
`safe_load` silently overwrites) can be reported.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Iterable

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from l4compile.errors import SpecError

NULL_TAG = "tag:yaml.org,2002:null"
# PyYAML (YAML 1.1) reads `1e-5` as a string; a plain (unquoted) scalar that looks
# like a number is accepted where a float is expected.
_PLAIN_FLOAT = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?$")
_MISSING = object()
# The largest size a spec field may hold. ONNX and onnxruntime index dimensions with int64, but element
# counts are products of sizes: keeping each size within int32 (the published family is below 2**24)
# keeps every tensor's byte size far inside int64. model.py bounds the layers and the total size.
MAX_SIZE = 2**31 - 1


def default_of(cls: type, name: str) -> Any:
    """A dataclass field's default, so that defaults live in model.py only."""
    for f in fields(cls):
        if f.name == name:
            return f.default_factory() if f.default is MISSING else f.default
    raise KeyError(name)


def line_of(node: Node) -> int:
    """1-based line where a node starts."""
    return node.start_mark.line + 1


def compose_document(text: str, file: str) -> MappingNode:
    """Parse `text` into the top-level mapping node, or raise SpecError."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        problem = ", ".join(p for p in parts if p) or str(exc).splitlines()[0]
        raise SpecError(f"invalid YAML: {problem}", file=file, line=line) from None
    except RecursionError:   # PyYAML composes recursively: thousands of nested [ or { exhaust the stack
        raise SpecError("invalid YAML: nested too deeply", file=file) from None
    if root is None:
        raise SpecError("the spec is empty: expected a mapping with name and text",
                        file=file, line=1)
    if not isinstance(root, MappingNode):
        raise SpecError(f"expected a mapping at the top level, found {describe(root)}",
                        file=file, line=line_of(root))
    return root


@dataclass(frozen=True)
class Tagged:
    """A scalar with a tag the safe loader does not construct (e.g. `!!python/int 5`)."""

    tag: str
    text: str


def scalar_value(node: ScalarNode) -> Any:
    """The Python value PyYAML's safe loader would give a scalar node."""
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError:
        return Tagged(node.tag, node.value)


def describe(node: Node) -> str:
    """A short human description of what a node holds, for 'found ...' messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = scalar_value(node)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{node.value} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{node.value} (a number)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, Tagged):
        return f"{value.text!r} tagged {value.tag}"
    return f"{node.value!r} (a {type(value).__name__})"


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


class Section:
    """A YAML mapping being read: unknown and duplicate keys are rejected up front,
    then each field is read with its type; errors carry file, line and dotted field."""

    def __init__(self, node: Node, *, file: str, path: str, line: int,
                 allowed: Iterable[str]) -> None:
        self.file, self.path, self.line = file, path, line
        self.allowed = tuple(allowed)
        if not isinstance(node, MappingNode):
            raise SpecError(f"expected a mapping, found {describe(node)}", file=file,
                            line=line_of(node), field=path or None)
        self.entries: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            self._add(key_node, value_node)

    def _add(self, key_node: Node, value_node: Node) -> None:
        key = key_node.value if isinstance(key_node, ScalarNode) else None
        if not isinstance(key, str):
            raise SpecError(f"expected a field name, found {describe(key_node)}",
                            file=self.file, line=line_of(key_node), field=self.path or None)
        if key not in self.allowed:
            raise SpecError(self._unknown_key_message(key), file=self.file,
                            line=line_of(key_node), field=self.field(key))
        if key in self.entries:
            first = line_of(self.entries[key][0])
            raise SpecError(f"duplicate key (first given on line {first})", file=self.file,
                            line=line_of(key_node), field=self.field(key))
        self.entries[key] = (key_node, value_node)

    def _unknown_key_message(self, key: str) -> str:
        where = f"in {self.path}" if self.path else "at the top level"
        message = f"unknown field {where}"
        close = difflib.get_close_matches(key, self.allowed, n=1)
        if close:
            return f"{message}; did you mean '{close[0]}'?"
        return f"{message}; expected one of: {', '.join(self.allowed)}"

    # -- locations --------------------------------------------------------------------

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.entries

    def line_of(self, key: str) -> int:
        """Line of a key's value, or of this section when the key is absent."""
        return line_of(self.entries[key][1]) if key in self.entries else self.line

    def key_line(self, key: str) -> int:
        return line_of(self.entries[key][0]) if key in self.entries else self.line

    def error(self, key: str, message: str, line: int | None = None) -> SpecError:
        return SpecError(message, file=self.file, line=line or self.line_of(key),
                         field=self.field(key))

    def node(self, key: str) -> Node | None:
        return self.entries[key][1] if key in self.entries else None

    def _required(self, key: str, what: str) -> SpecError:
        return SpecError(f"missing required field (expected {what})",
                         file=self.file, line=self.line, field=self.field(key))

    # -- typed fields -----------------------------------------------------------------

    def _scalar(self, key: str, what: str, default: Any, nullable: bool) -> tuple[Any, bool]:
        """(value, present): the constructed scalar, or the default when absent."""
        node = self.node(key)
        if node is None:
            if default is _MISSING:
                raise self._required(key, what)
            return default, False
        if nullable and is_null(node):
            return None, True
        if not isinstance(node, ScalarNode) or is_null(node):
            raise self.error(key, f"expected {what}, found {describe(node)}")
        return scalar_value(node), True

    def int(self, key: str, *, default: Any = _MISSING, minimum: int | None = 1,
            nullable: bool = False, maximum: int = MAX_SIZE,
            why: str = "the largest size a build can hold") -> Any:
        what = "an integer" if minimum is None else _at_least(minimum)
        what += " or null" if nullable else ""
        value, present = self._scalar(key, what, default, nullable)
        if not present or value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected {what}, found {describe(self.node(key))}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected {what}, found {value}")
        if value > maximum:
            raise self.error(key, f"expected at most {maximum:,} ({why}), found {value:,}")
        return value

    def float(self, key: str, *, default: Any = _MISSING, positive: bool = True) -> Any:
        """A finite number, > 0 when `positive`, else >= 0 (integers are accepted)."""
        what = "a positive number" if positive else "a non-negative number"
        value, present = self._scalar(key, what, default, nullable=False)
        if not present:
            return value
        node = self.node(key)
        if isinstance(value, str) and node.style is None and _PLAIN_FLOAT.match(value):
            value = float(value.replace("_", ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected {what}, found {describe(node)}")
        value = float(value)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise self.error(key, f"expected {what}, found {node.value}")
        return value

    def bool(self, key: str, *, default: Any = _MISSING) -> Any:
        value, present = self._scalar(key, "true or false", default, nullable=False)
        if present and not isinstance(value, bool):
            raise self.error(key, f"expected true or false, found {describe(self.node(key))}")
        return value

    def str(self, key: str, *, default: Any = _MISSING, nonempty: bool = False) -> Any:
        what = "a non-empty string" if nonempty else "a string"
        value, present = self._scalar(key, what, default, nullable=False)
        if not present:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected {what}, found {describe(self.node(key))}")
        if nonempty and not value.strip():
            raise self.error(key, f"expected {what}, found {value!r}")
        try:   # YAML's "\ud800" escape gives a lone surrogate, which no file name, ONNX string or UTF-8 text holds
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise self.error(key, f"expected {what} of Unicode text, found {value!r} (its character "
                                  f"{value[exc.start]!r} is half of a UTF-16 pair)") from None
        return value

    def int_list(self, key: str, *, allow_scalar: bool = False) -> list[tuple[int, int]]:
        """A list of non-negative integers as (value, line) pairs."""
        node = self.node(key)
        what = "a list of non-negative integers"
        what = f"a non-negative integer or {what}" if allow_scalar else what
        if node is None:
            raise self._required(key, what)
        items = [node] if allow_scalar and isinstance(node, ScalarNode) else None
        if items is None:
            if not isinstance(node, SequenceNode):
                raise self.error(key, f"expected {what}, found {describe(node)}")
            items = node.value
        out = []
        for item in items:
            value = scalar_value(item) if isinstance(item, ScalarNode) else None
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
                raise self.error(key, f"expected {what}, found {describe(item)}",
                                 line=line_of(item))
            out.append((value, line_of(item)))
        return out

    def section(self, key: str, allowed: Iterable[str], *, required: bool = False,
                nullable: bool = False) -> Section | None:
        """A nested mapping; None when absent (or null, if `nullable`)."""
        node = self.node(key)
        if node is None:
            if required:
                raise self._required(key, "a mapping")
            return None
        if nullable and is_null(node):
            return None
        return Section(node, file=self.file, path=self.field(key), line=self.key_line(key),
                       allowed=allowed)


def _at_least(minimum: int) -> str:
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"
