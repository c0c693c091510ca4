"""`l4compile build --weights` streams: its peak RSS is about the largest tensor, not the model
(bench/build_memory.py measures the same on a checkpoint of more than 2 GB)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("build_memory", ROOT / "bench" / "build_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_build_peak_rss_is_largest_tensor_plus_overhead(tmp_path):
    bench = load_bench()
    spec = bench.bench_spec(layers=2)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(bench.dump_spec_yaml(spec))
    size, _, largest = bench.write_checkpoint(spec, tmp_path / "checkpoint")   # ~1.2 GB, largest 0.54 GB
    cli = [sys.executable, "-m", "l4compile.cli", "build", str(spec_file)]
    overhead, _, _ = bench.run_measured(cli + ["--dry-run"])
    peak, _, _ = bench.run_measured(cli + ["--weights", str(tmp_path / "checkpoint"), "--dtype", "bfloat16",
                                           "-o", str(tmp_path / "build")])
    assert peak < overhead + largest + 256 * 2**20, (peak, overhead, largest)
    assert peak < size  # the model never is in memory at once
