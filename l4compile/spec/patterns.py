"""The two layer patterns of Llama 4, as transformers' Llama4TextConfig builds them.

The loader expands a pattern into explicit indices; the dumper finds the pattern
again so that a dumped spec reads like a hand-written one.
"""

from __future__ import annotations


def nope_layers_from_interval(num_layers: int, interval: int) -> tuple[int, ...]:
    """Layer i is a NoPE (global, no rotary) layer when (i + 1) % interval == 0."""
    return tuple(i for i in range(num_layers) if (i + 1) % interval == 0)


def moe_layers_from_step(num_layers: int, step: int) -> tuple[int, ...]:
    """MoE layers step-1, 2*step-1, ... (`interleave_moe_layer_step`)."""
    return tuple(range(step - 1, num_layers, step))


def find_nope_interval(num_layers: int, nope_layers: tuple[int, ...]) -> int | None:
    """The interval that gives exactly `nope_layers`, if any (never for an empty list)."""
    for interval in range(1, num_layers + 1):
        if nope_layers_from_interval(num_layers, interval) == nope_layers:
            return interval
    return None


def find_moe_step(num_layers: int, moe_layers: tuple[int, ...]) -> int | None:
    """The interleave step that gives exactly `moe_layers`, if any (never for an empty list)."""
    for step in range(1, num_layers + 1):
        if moe_layers_from_step(num_layers, step) == moe_layers:
            return step
    return None
