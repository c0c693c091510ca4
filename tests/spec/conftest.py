"""Shared fixtures of the spec tests: the shipped specs and a writer for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"
FULL_SIZE = ("scout", "maverick", "behemoth")
SHIPPED = FULL_SIZE + ("tiny-scout", "tiny-maverick", "bench-16e", "bench-16e-8k", "bench-128e", "bench-1b5")


def spec_path(name: str) -> Path:
    return SPECS_DIR / f"{name}.yaml"


@pytest.fixture
def tiny_scout_text() -> str:
    return spec_path("tiny-scout").read_text()


@pytest.fixture
def write_spec(tmp_path: Path):
    """write_spec(text, name) -> path of a spec file in a temporary directory."""
    def write(text: str, name: str = "bad.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write
