"""Where a decode step goes: onnxruntime's profiler over decode steps after N cached tokens.

For each context length the cache is filled to N positions synthetically (the cost of a step does
not depend on the cached values), then `--steps` single-token steps run in a profiled session. It
prints, per context: model-run time per step, kernel time per step, nodes executed per step, and
the op types that take the most time (count per step, ms per step).

    python bench/decode_profile.py BUILD_DIR [--contexts 2048 8192 32768] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def profiled_engine(build: Path, threads: int, prefix: str):
    import onnxruntime as ort
    from l4compile.runtime import Engine
    from l4compile.runtime.manifest import Manifest
    from l4compile.runtime.ort_backend import OnnxRuntimeBackend
    manifest = Manifest.read(build)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    session = ort.InferenceSession(str(build / manifest.files["model"]), options, providers=["CPUExecutionProvider"])
    return Engine(build, manifest, OnnxRuntimeBackend(manifest, session)), session


def fill_cache(cache, length: int) -> None:
    """Pretend `length` positions are cached (works for both cache layouts)."""
    if hasattr(cache, "lengths"):
        cache.lengths[:] = length
    cache.length = length


def profile(build: Path, context: int, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        engine, session = profiled_engine(build, threads, os.path.join(tmp, "profile"))
        cache = engine.new_cache(1, context + steps + 2)
        fill_cache(cache, context)
        token = np.array([[5]], dtype=np.int64)
        engine.step(token, cache, logits_start=0)   # warm-up run, left out below
        for _ in range(steps):
            engine.step(token, cache, logits_start=0)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and e["ts"] >= first_end]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        op = e["args"].get("op_name", "?")
        per_op[op][0] += 1
        per_op[op][1] += e["dur"]
    n = len(runs) - 1
    return {"context": context, "run_ms": sum(r["dur"] for r in runs[1:]) / n / 1000,
            "kernel_ms": sum(e["dur"] for e in kernels) / n / 1000, "nodes": len(kernels) / n,
            "ops": {op: (c / n, t / n / 1000) for op, (c, t) in per_op.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    for context in args.contexts:
        r = profile(args.build, context, args.steps, args.threads)
        print(f"context {context}: model run {r['run_ms']:.2f} ms/step, kernels {r['kernel_ms']:.2f} ms/step, "
              f"{r['nodes']:.0f} nodes/step")
        for op, (count, ms) in sorted(r["ops"].items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {op:28s} {count:6.0f} nodes {ms:8.3f} ms")


if __name__ == "__main__":
    main()
