"""Typed reading of one JSON object of a config.json, with transformers' defaults.

Every error is a SpecError naming config.json and the dotted key
(`text_config.rope_parameters.rope_type`), what was expected and what was found.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from l4compile.errors import SpecError
from l4compile.spec.yamlnode import MAX_SIZE

REQUIRED = object()  # a default that means "this key must be given"


class ConfigSection:
    """A config object: unknown keys are rejected up front, then each key is read with its type."""

    def __init__(self, data: object, *, file: str, path: str, defaults: dict[str, Any],
                 ignored: Iterable[str] = ()) -> None:
        self.file, self.path, self.defaults = file, path, defaults
        if not isinstance(data, dict):
            raise SpecError(f"expected a JSON object, found {_show(data)}", file=file, field=path or None)
        self.data = data
        ignored = set(ignored)
        for key in sorted(data):
            if key == "quantization_config":
                raise self.error(key, "quantized checkpoints are not supported (expected unquantized "
                                      "float32, float16 or bfloat16 weights)")
            if key not in defaults and key not in ignored:
                raise self.error(key, "unknown config key: l4compile cannot tell whether it changes the "
                                      "model's math, so it refuses to drop it")

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> SpecError:
        return SpecError(message, file=self.file, field=self.field(key))

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        """The value as written, or transformers' default when the key is absent."""
        value = self.data[key] if key in self.data else self.defaults[key]
        if value is REQUIRED:
            raise self.error(key, "missing required key")
        return value

    def expect(self, key: str, supported: Any, why: str) -> None:
        value = self.raw(key)
        if value != supported:
            raise self.error(key, f"expected {_show(supported)} ({why}), found {_show(value)}")

    def int(self, key: str, *, minimum: int = 1, nullable: bool = False) -> int | None:
        value = self.raw(key)
        if value is None and nullable:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SIZE:
            raise self.error(key, f"expected at most {MAX_SIZE:,} (the largest size a build can hold), found {value:,}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.error(key, f"expected {what}{' or null' if nullable else ''}, found {_show(value)}")
        return value

    def float(self, key: str, *, positive: bool = True) -> float:
        value = self.raw(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (positive and value == 0):
            what = "a positive number" if positive else "a non-negative number"
            raise self.error(key, f"expected {what}, found {_show(value)}")
        return float(value)

    def bool(self, key: str, *, allow_int: bool = False) -> bool:
        """true/false; with `allow_int`, an integer is read for its truth (released Llama 4 configs
        write `attn_temperature_tuning: 4`, which transformers treats as true)."""
        value = self.raw(key)
        if isinstance(value, bool) or (allow_int and isinstance(value, int)):
            return bool(value)
        raise self.error(key, f"expected true or false, found {_show(value)}")

    def int_list(self, key: str, *, allow_scalar: bool = False, minimum: int = 0) -> list[int] | None:
        """A list of integers (null stays None)."""
        value = self.raw(key)
        if value is None:
            return None
        items = [value] if allow_scalar and not isinstance(value, list) else value
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                  and i >= minimum for i in items):
            raise self.error(key, f"expected a list of integers >= {minimum}, found {_show(value)}")
        return list(items)

    def section(self, key: str, defaults: dict[str, Any], ignored: Iterable[str] = ()) -> "ConfigSection":
        return ConfigSection(self.raw(key), file=self.file, path=self.field(key), defaults=defaults,
                             ignored=ignored)


def _show(value: Any) -> str:
    """A value as it is written in JSON, shortened."""
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
