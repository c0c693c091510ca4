"""Fixtures of the training tests: a tiny corpus, and the `l4compile train` command run in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l4compile.cli import main

SPECS = Path(__file__).resolve().parents[2] / "specs"
TINY_SCOUT = str(SPECS / "tiny-scout.yaml")
TEXT = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "fox.txt"
    path.write_text(TEXT * 12)
    return path


def train(*args: str, spec: str = TINY_SCOUT) -> int:
    return main(["train", spec, "--tokenizer", "bytes", "--seq-len", "32", "--batch", "4", "--lr", "3e-3", "--threads", "1",
                 *map(str, args)])


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
