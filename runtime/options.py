"""The numeric options of loading and generation, validated in one place for the Python API and the CLI.

Each check takes the value a caller gave (from Python, or parsed from a command-line string) and
returns it normalised, or raises RuntimeInputError naming the option: NaN and infinities, values out
of range, and type misuse (a float where a count is expected, a bool for a number, a string seed,
a bare int for a list of stop tokens) are refused instead of giving silent garbage.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

from l4compile.runtime.errors import RuntimeInputError

INT64_MAX = 2**63 - 1
SEED_MAX = 2**64 - 1        # numpy's SeedSequence takes any non-negative integer; keep it to 64 bits
THREADS_MAX = 1024


def integer(name: str, value: Any, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """An integer (Python or numpy, never bool or float) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RuntimeInputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not minimum <= value <= maximum:
        if maximum == INT64_MAX:
            bounds = f">= {minimum}" if value < minimum else "below 2**63"
        else:
            bounds = f">= {minimum} and <= {maximum}"
        raise RuntimeInputError(f"{name} must be {bounds}, got {value}")
    return value


def real(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """A finite number (int or float, never bool or string) in [low, high], or (low, high] if `low_open`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RuntimeInputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise RuntimeInputError(f"{name} must be a finite number, got {value}")
    if value > high or value < low or (low_open and value == low):
        bounds = f"in ({low:g}, {high:g}]" if low_open else f">= {low:g} and <= {high:g}"
        raise RuntimeInputError(f"{name} must be {bounds}, got {value}")
    return value


def temperature(value: Any) -> float:
    """0 is greedy; above 1e4 every token is equally likely anyway (and the softmax loses precision)."""
    return real("temperature", value, 0.0, 1e4)


def top_p(value: Any) -> float:
    return real("top_p", value, 0.0, 1.0, low_open=True)


def top_k(value: Any) -> int:
    """0: no limit."""
    return integer("top_k", value, 0, INT64_MAX)


def seed(value: Any) -> int | None:
    """None: a fresh, unseeded generator."""
    return None if value is None else integer("seed", value, 0, SEED_MAX)


def threads(value: Any) -> int | None:
    """onnxruntime intra-op threads; None: onnxruntime's default."""
    return None if value is None else integer("threads", value, 1, THREADS_MAX)


def max_new_tokens(value: Any) -> int:
    return integer("max_new_tokens", value, 0, INT64_MAX)


def stop_tokens(value: Any) -> tuple[int, ...] | None:
    """A list or tuple of token ids (None: the build's eos ids); a bare int is a mistake, not a list of one."""
    if value is None:
        return None
    if (isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or isinstance(value, numbers.Number)
            or getattr(value, "ndim", 1) == 0):   # np.array(2) is Iterable to isinstance, but iterating it fails
        raise RuntimeInputError(f"stop_tokens must be a list of token ids, got {value!r} ({type(value).__name__})")
    return tuple(integer("stop token", v, 0, INT64_MAX) for v in value)


def size(name: str, value: Any, minimum: int = 1) -> int:
    """A byte size or count from the command line or Python (e.g. a shard size)."""
    return integer(name, value, minimum, INT64_MAX)


def number(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A check for a finite number in a range, for options that have no function of their own above."""
    def check(value: Any) -> float:
        value = real(name, value, low, high, low_open)
        if high_open and value == high:
            raise RuntimeInputError(f"{name} must be < {high:g}, got {value}")
        return value
    return check


def count(name: str, minimum: int = 0, maximum: int = INT64_MAX):
    """A check for an integer in [minimum, maximum]."""
    return lambda value: integer(name, value, minimum, maximum)


def cli_type(check: Callable[[Any], Any], parse: Callable[[str], Any] = int, what: str = "value"):
    """An argparse type: parse the string, then apply the same check as the Python API. The one adapter of
    every command's typed options (l4compile/cli.py and the commands it adds).

    Text that `parse` cannot read is "expected {what}, found '{text}'"; a value the check refuses carries the
    check's own message (a RuntimeInputError, or the ValueError of a check that reads the text itself, with
    parse=str: a size like 80GB, a dtype, token ids). Either is a usage error (argparse's exit status 2).
    """
    import argparse

    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}") from None
        try:
            return check(value)
        except (RuntimeInputError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = what
    return convert
